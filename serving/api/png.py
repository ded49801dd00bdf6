"""8-bit grayscale PNG encoding and strict decoding with the standard library (zlib): enough for uint8
images, no Pillow."""
from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W] -> PNG bytes (color type 0, bit depth 8, no interlace, filter 0 on every row)."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"encode_png takes a uint8 [H, W] image, got {image.dtype} {image.shape}")
    h, w = image.shape
    rows = np.hstack([np.zeros((h, 1), np.uint8), image])  # [H, 1 + W]: each row led by its filter byte
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b"")


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """[n, H, W] -> [n, H*factor, W*factor], nearest neighbour: each pixel becomes a factor x factor block."""
    if factor == 1:
        return images
    return images.repeat(factor, axis=1).repeat(factor, axis=2)


def decode_png(data: bytes, max_pixels: int = 1 << 20) -> np.ndarray:
    """PNG bytes -> uint8 [H, W], for 8-bit grayscale only (color type 0, no interlace): what clients
    upload. Every chunk's CRC is checked, the five row filters are undone, and decompression stops at the
    size the header promises, so a small upload cannot inflate into a large one. Raises ValueError saying
    what is wrong."""
    if data[:8] != _SIGNATURE:
        raise ValueError("not a PNG (the PNG signature is missing)")
    pos, header, idat = 8, None, []
    while True:
        if pos + 12 > len(data):
            raise ValueError("truncated PNG: it ends before its IEND chunk")
        (length,), tag = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise ValueError(f"truncated PNG: chunk {tag!r} is cut short")
        if struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] != zlib.crc32(tag + body):
            raise ValueError(f"corrupt PNG: chunk {tag!r} fails its CRC")
        pos += 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body) if length == 13 else None
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if header is None:
        raise ValueError("corrupt PNG: no valid IHDR chunk")
    w, h, depth, color, compression, filtering, interlace = header
    if (depth, color) != (8, 0):
        raise ValueError(f"the PNG must be 8-bit grayscale (bit depth 8, color type 0), got bit depth {depth}, "
                         f"color type {color}")
    if (compression, filtering, interlace) != (0, 0, 0):
        raise ValueError("the PNG must not be interlaced")
    if not 0 < w * h <= max_pixels:
        raise ValueError(f"the PNG is {w}x{h}: too large or empty")
    stream = zlib.decompressobj()
    try:
        raw = stream.decompress(b"".join(idat), h * (w + 1))
    except zlib.error as exc:
        raise ValueError(f"corrupt PNG: image data does not decompress ({exc})") from None
    if len(raw) != h * (w + 1):
        raise ValueError(f"corrupt PNG: {len(raw)} bytes of image data for a {w}x{h} image")
    return _unfilter(np.frombuffer(raw, np.uint8).reshape(h, w + 1))


def _unfilter(rows: np.ndarray) -> np.ndarray:
    """[H, 1 + W] filtered scanlines (filter byte first) -> [H, W] pixels; one byte per pixel, so the
    "left" neighbour is the previous byte (PNG spec, section 9)."""
    h, w = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((h, w), np.uint8)
    prev = np.zeros(w, np.int32)
    for y in range(h):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        if kind == 0:
            cur = line
        elif kind == 1:   # Sub: running sum along the row
            cur = np.cumsum(line) % 256
        elif kind == 2:   # Up
            cur = (line + prev) % 256
        elif kind in (3, 4):  # Average, Paeth: each pixel needs the one just decoded, so one at a time
            cur = np.zeros(w, np.int32)
            for x in range(w):
                left, upleft = (cur[x - 1], prev[x - 1]) if x else (0, 0)
                cur[x] = (line[x] + ((left + prev[x]) // 2 if kind == 3 else _paeth(left, prev[x], upleft))) % 256
        else:
            raise ValueError(f"corrupt PNG: unknown row filter {kind}")
        out[y], prev = cur, cur
    return out


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)
