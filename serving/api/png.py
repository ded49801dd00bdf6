"""8-bit grayscale PNG encoding with the standard library (zlib): enough for uint8 images, no Pillow."""
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
