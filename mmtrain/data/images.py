"""Image decoding and the vision encoder's preprocessing, fast enough for the data workers.

`ImageTransform.from_pretrained(dir)` reads the encoder's own `preprocessor_config.json`
(resize of the shortest edge, centre crop, rescale, normalise: CLIP, SigLIP and BLIP-style
processors) and reproduces it with PIL + numpy, matching transformers' PIL image processor
(tested). With `fast=True` (default) JPEGs are decoded at a reduced DCT scale when they are at
least twice the target size (PIL's `draft`), which is most of the decode time for large photos.

The data workers stop at the resized, cropped uint8 image (`load`, `__call__`): a quarter of the
bytes of fp32 pixels cross the process boundary and the host-to-device copy. `normalize` turns
it into the encoder's input on whatever device it is on, with the same two fp32 operations (a
subtract and a multiply) and so the same values as normalising on the host.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


# An image more than this many times longer than wide is a strip, not a picture: resized to the
# shortest edge it would be enormous (1 x 4000 px at 224: 224 x 896,000). Such a sample raises,
# and the reader skips and counts it like any unreadable one.
MAX_ASPECT = 50


def to_rgb(im: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB: transparency over white (PIL's plain convert keeps whatever colour
    the transparent pixels hold), 16/32-bit greyscale scaled to 8 bits (a plain convert clips it
    at 255), CMYK, greyscale and palette images converted. Raises ValueError for a strip."""
    w, h = im.size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(
            f"image of {w} x {h} pixels: more than {MAX_ASPECT} times longer than wide"
        )
    if im.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNGs open as one of these)
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


@dataclass
class ImageTransform:
    resize: int = 224  # shortest edge after resizing
    crop: Optional[int] = 224  # centre crop (None: no crop, resize to resize x resize)
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    resample: int = Image.BICUBIC
    rescale: float = 1 / 255
    fast: bool = True

    @classmethod
    def from_pretrained(cls, directory: str, fast: bool = True) -> ImageTransform:
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the vision encoder directory needs its processor config"
            )
        c = json.loads(path.read_text())
        size = c.get("size", 224)
        crop = c.get("crop_size") if c.get("do_center_crop", "crop_size" in c) else None
        if isinstance(size, dict):
            resize = size.get("shortest_edge") or size.get("height")
            if "height" in size and "shortest_edge" not in size and crop is None:
                crop = size["height"]  # SigLIP: a square resize
        else:
            resize = size
        if isinstance(crop, dict):
            crop = crop.get("height")
        return cls(
            resize=int(resize),
            crop=int(crop) if crop else None,
            mean=tuple(c.get("image_mean", CLIP_MEAN)),
            std=tuple(c.get("image_std", CLIP_STD)),
            resample=int(c.get("resample", Image.BICUBIC)),
            rescale=float(c.get("rescale_factor", 1 / 255)),
            fast=fast,
        )

    def decode(self, data: bytes) -> Image.Image:
        im = Image.open(io.BytesIO(data))
        if self.fast and im.format == "JPEG":
            # only ever reduces to >= the requested size
            im.draft("RGB", (self.resize, self.resize))
        return to_rgb(im)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        w, h = im.size
        if self.crop is None:  # square resize (SigLIP-style)
            im = im.resize((self.resize, self.resize), self.resample)
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.resize * long / short)
            size = (self.resize, new_long) if w <= h else (new_long, self.resize)
            if size != (w, h):
                im = im.resize(size, self.resample)
            w, h = im.size
            top, left = int((h - self.crop) / 2.0), int((w - self.crop) / 2.0)
            im = im.crop((left, top, left + self.crop, top + self.crop))
        # uint8 HWC -> CHW (the encoder's layout); normalised later, where it is used
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __post_init__(self):
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        self._offset = mean / self.rescale  # (x * rescale - mean) / std
        self._gain = self.rescale / std

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> the encoder's fp32 input, on `pixels`' device."""
        offset, gain = self._offset.to(pixels.device), self._gain.to(pixels.device)
        return pixels.float().sub_(offset).mul_(gain)

    def load(self, data: bytes) -> torch.Tensor:
        """Encoded image -> resized, cropped uint8 CHW tensor."""
        return self(self.decode(data))


def image_bytes(sample: dict) -> Optional[bytes]:
    for k in IMAGE_KEYS:
        if k in sample:
            return sample[k]
    return None


class PixelLimit:
    """A sample decoder behind a size check: the image's width and height are read from its header
    (no pixel decoded) and an image over `max_pixels` raises, which the reader counts as a skipped
    sample (`data.max_image_pixels`)."""

    def __init__(self, decode, max_pixels: int):
        self.decode, self.max_pixels = decode, max_pixels

    def __call__(self, raw: dict):
        data = image_bytes(raw)
        if data is not None:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
            if w * h > self.max_pixels:
                raise ValueError(
                    f"image of {w} x {h} pixels is over data.max_image_pixels={self.max_pixels}"
                )
        return self.decode(raw)
