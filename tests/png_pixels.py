"""Reading a PNG's pixels with the standard library's zlib (and numpy, which torch brings): enough
to tell a drawn screenshot from a blank one, without an imaging library as a dependency."""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (8-bit, not palette)


def png_pixels(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit, non-interlaced PNG (what Chromium's screenshots are) as a
    height x width x channels array.

    Raises:
        ValueError: not a PNG, or a kind this reader does not handle (palette, 16-bit, interlaced).
    """
    if not data.startswith(_SIGNATURE):
        raise ValueError("not a PNG file (no PNG signature)")
    position, header, compressed = len(_SIGNATURE), None, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        position += 12 + length  # length, type, body, CRC
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            compressed.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("no IHDR chunk")
    width, height, depth, colour_type, _, _, interlace = header
    if depth != 8 or colour_type not in _CHANNELS or interlace:
        raise ValueError(f"unsupported PNG: bit depth {depth}, colour type {colour_type}, interlace {interlace}")
    channels = _CHANNELS[colour_type]
    raw = zlib.decompress(b"".join(compressed))
    return _unfilter(raw, width, height, channels).reshape(height, width, channels)


def distinct_colours(pixels: np.ndarray) -> int:
    """How many different pixel values the image holds."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    packed = np.zeros(len(flat), dtype=np.uint32)
    for channel in range(flat.shape[1]):
        packed = (packed << 8) | flat[:, channel]
    return len(np.unique(packed))


def _unfilter(raw: bytes, width: int, height: int, bpp: int) -> np.ndarray:
    """Undo each scanline's PNG filter (RFC 2083, section 6). None, Sub and Up are done by numpy
    on the whole line; Average and Paeth depend on the pixel just decoded, so they go a pixel at a
    time (a pixel's channels still together)."""
    stride = width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.uint8)
    lines = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    for y in range(height):
        kind, line = lines[y, 0], lines[y, 1:]
        if kind == 0:
            current = line.copy()
        elif kind == 1:  # Sub: a running sum along the line, per channel, modulo 256
            current = np.cumsum(line.reshape(width, bpp), axis=0, dtype=np.uint8).reshape(stride)
        elif kind == 2:  # Up
            current = line + previous
        elif kind == 3:  # Average of left and up
            current = _sequential(line, previous, bpp, _average)
        elif kind == 4:  # Paeth
            current = _sequential(line, previous, bpp, _paeth)
        else:
            raise ValueError(f"scanline {y}: unknown filter type {kind}")
        out[y] = current
        previous = current
    return out


def _sequential(line: np.ndarray, previous: np.ndarray, bpp: int, predict) -> np.ndarray:
    current = bytearray(line.tobytes())
    above = previous.tobytes()
    for i in range(len(current)):
        left = current[i - bpp] if i >= bpp else 0
        upper_left = above[i - bpp] if i >= bpp else 0
        current[i] = (current[i] + predict(left, above[i], upper_left)) & 0xFF
    return np.frombuffer(bytes(current), dtype=np.uint8)


def _average(left: int, up: int, upper_left: int) -> int:
    return (left + up) >> 1


def _paeth(left: int, up: int, upper_left: int) -> int:
    estimate = left + up - upper_left
    to_left, to_up, to_upper_left = abs(estimate - left), abs(estimate - up), abs(estimate - upper_left)
    if to_left <= to_up and to_left <= to_upper_left:
        return left
    return up if to_up <= to_upper_left else upper_left
