"""The PNG reader the browser tests check screenshots with: every scanline filter undone."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from tests.png_pixels import distinct_colours, png_pixels


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(left: int, up: int, upper_left: int) -> int:
    estimate = left + up - upper_left
    distances = (abs(estimate - left), abs(estimate - up), abs(estimate - upper_left))
    return (left, up, upper_left)[distances.index(min(distances))]


def _filtered(row: bytes, previous: bytes, kind: int, bpp: int) -> bytes:
    """The encoder's side of RFC 2083's filters, written from the specification byte by byte."""
    out = bytearray()
    for i, value in enumerate(row):
        left = row[i - bpp] if i >= bpp else 0
        up = previous[i]
        upper_left = previous[i - bpp] if i >= bpp else 0
        predictor = (0, left, up, (left + up) // 2, _paeth(left, up, upper_left))[kind]
        out.append((value - predictor) % 256)
    return bytes(out)


def encode_png(pixels: np.ndarray, filters: list[int]) -> bytes:
    """An 8-bit RGB or RGBA PNG of `pixels` with the given filter on each scanline."""
    height, width, channels = pixels.shape
    rows = [pixels[y].tobytes() for y in range(height)]
    previous = bytes(width * channels)
    raw = bytearray()
    for row, kind in zip(rows, filters):
        raw += bytes([kind]) + _filtered(row, previous, kind, channels)
        previous = row
    header = struct.pack(">IIBBBBB", width, height, 8, {3: 2, 4: 6}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(raw))) + _chunk(b"IEND", b"")


@pytest.mark.parametrize("channels", [3, 4])
def test_every_filter_type_reads_back_the_pixels(channels):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(10, 7, channels), dtype=np.uint8)
    data = encode_png(pixels, filters=[0, 1, 2, 3, 4, 4, 3, 2, 1, 0])
    assert np.array_equal(png_pixels(data), pixels)


def test_distinct_colours_counts_pixel_values_not_channel_values():
    pixels = np.zeros((2, 2, 3), dtype=np.uint8)
    pixels[0, 0] = (255, 0, 0)
    pixels[0, 1] = (0, 255, 0)
    pixels[1, 0] = (0, 0, 255)
    assert distinct_colours(pixels) == 4  # three colours and black
    assert distinct_colours(np.full((5, 5, 4), 255, dtype=np.uint8)) == 1


def test_not_a_png_is_refused():
    with pytest.raises(ValueError, match="not a PNG"):
        png_pixels(b"GIF89a")
