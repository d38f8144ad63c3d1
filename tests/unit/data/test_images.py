"""Images as real data brings them: transparency, 16-bit greyscale, CMYK, palettes and strips each
get a defined behaviour (issue 18, item 7)."""

import io

import numpy as np
import pytest
from PIL import Image

from mmtrain.data.images import ImageTransform, to_rgb
from mmtrain.data.reader import pil_decode


def png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_transparent_pixels_are_white_not_the_colour_they_hide():
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    rgb = to_rgb(Image.open(io.BytesIO(png(im))))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (0, 0, 255)
    palette = im.convert("P")  # a palette image with a transparent colour
    palette.info["transparency"] = palette.getpixel((1, 1))
    assert to_rgb(palette).getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))  # half of 16-bit white
    rgb = to_rgb(Image.open(io.BytesIO(png(grey))))
    assert rgb.getpixel((0, 0)) == (128, 128, 128)  # a plain convert gave (255, 255, 255)


def test_cmyk_and_greyscale_become_rgb():
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (4, 4), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_a_strip_is_refused_by_the_transform_and_by_the_vlm_decoder():
    strip = png(Image.new("RGB", (1, 4000)))
    with pytest.raises(ValueError, match=r"image of 1 x 4000 pixels: more than 50 times longer"):
        ImageTransform(resize=32, crop=32).load(strip)  # it used to resize to 32 x 128,000
    with pytest.raises(ValueError, match="1 x 4000 pixels"):
        pil_decode({"__key__": "k", "png": strip})
    wide = ImageTransform(resize=32, crop=32).load(png(Image.new("RGB", (400, 40))))
    assert tuple(wide.shape) == (3, 32, 32)  # 10:1 is a picture


def test_a_vision_directory_without_its_processor_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config.json is missing"):
        ImageTransform.from_pretrained(str(tmp_path))
