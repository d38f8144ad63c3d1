"""data.max_image_pixels: an image's size is read from its header, and one over the limit is a
skipped sample before any of its pixels is decoded."""

import io
import struct
import zlib

import pytest
from PIL import Image

from mmtrain.data.images import PixelLimit


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (and whose pixel data is a few bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.chaos
def test_an_image_over_the_limit_is_refused_from_its_header_alone():
    decoded = []
    guard = PixelLimit(lambda raw: decoded.append(raw) or raw, 50_000_000)
    # 13,000 x 13,000: under PIL's own limit (179M), 1.1 GB once decoded
    with pytest.raises(ValueError, match=r"13000 x 13000 pixels is over data.max_image_pixels"):
        guard({"__key__": "bomb", "png": png_header(13000, 13000)})
    assert not decoded  # refused before the decoder saw it
    ok = {"__key__": "fine", "jpg": small_jpeg()}
    assert guard(ok) is ok and decoded == [ok]
    assert guard({"__key__": "text only", "txt": b"no image"})["__key__"] == "text only"
