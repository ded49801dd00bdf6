"""The maths of the families' own operations beyond sampling, around their graphs: VAE latent paths and
reconstruction error, the flow's dequantized input, and the input complexity that corrects a likelihood
for anomaly detection. Pure numpy: the deployments run the graphs, these functions make what goes in and
read what comes out; images are uint8 [n, 28, 28]. (PixelCNN's exact likelihood from its mixture
parameters is core.samplers.autoregressive.bits_per_dim: torch, which only its replica imports.)"""
from __future__ import annotations

import math
import zlib

import numpy as np

# family -> what its deployment offers beyond `generate`
FAMILY_OPERATIONS = {"vae": ("interpolate", "reconstruct"), "flow": ("likelihood",), "pixelcnn": ("likelihood",)}
# family -> the graphs its deployment opens beside its sampling graph for them (PixelCNN samples with
# `step`, one pixel per row; its likelihood needs every pixel's mixture parameters from `logits`)
OPERATION_GRAPHS = {"vae": ("encode",), "flow": ("log_prob",), "pixelcnn": ("logits",)}


def operations_of(family: str) -> tuple[str, ...]:
    return ("generate", *FAMILY_OPERATIONS.get(family, ()))


def slerp(a: np.ndarray, b: np.ndarray, frames: int) -> np.ndarray:
    """[frames, d] from a to b (each [d]) along the great circle, norms interpolated linearly. For latents
    drawn from N(0, I): a straight line between two of them passes near the origin, where the prior has
    almost no mass and the decoder gives washed-out images (White 2016, "Sampling generative networks")."""
    t = np.linspace(0.0, 1.0, frames)[:, None]                       # [frames, 1]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = a / max(na, 1e-12), b / max(nb, 1e-12)
    omega = math.acos(float(np.clip(ua @ ub, -1.0, 1.0)))
    if math.sin(omega) < 1e-6:  # the same or opposite directions: no unique great circle
        return lerp(a, b, frames)
    direction = (np.sin((1 - t) * omega) * ua + np.sin(t * omega) * ub) / math.sin(omega)
    return (direction * ((1 - t) * na + t * nb)).astype(np.float32)


def lerp(a: np.ndarray, b: np.ndarray, frames: int) -> np.ndarray:
    """[frames, d] on the straight line from a to b: for posterior means, which need not look like prior draws."""
    t = np.linspace(0.0, 1.0, frames)[:, None]
    return ((1 - t) * a + t * b).astype(np.float32)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 [n, 28, 28] -> float32 [n, 1, 28, 28] in [0, 1]: vae.encode's input (families.common.to_unit)."""
    return (images[:, None].astype(np.float32) / 255.0).astype(np.float32)


def reconstruction_mse(images: np.ndarray, decoded: np.ndarray) -> np.ndarray:
    """[n]: mean squared error per pixel between images (uint8 [n, 28, 28]) and the decoder's mean
    (float [n, 1, 28, 28] in [0, 1]), both on the [0, 1] scale: the VAE's anomaly score."""
    return ((decoded[:, 0] - images / 255.0) ** 2).reshape(len(images), -1).mean(1)


def dequantize(images: np.ndarray, seed: int) -> np.ndarray:
    """uint8 [n, 28, 28] -> float32 [n, 1, 28, 28] = (x + u) / 256, u ~ U[0, 1) from numpy's PCG64 seeded
    with `seed`: flow.log_prob's input, as families.common.dequantize (whose noise comes from torch).
    The flow's bits/dim is then a one-sample estimate of an upper bound on the 8-bit image's."""
    u = np.random.default_rng(seed).random((len(images), 1, *images.shape[1:]), dtype=np.float32)
    return ((images[:, None].astype(np.float32) + u) / 256.0).astype(np.float32)


def complexity_bits_per_dim(images: np.ndarray) -> np.ndarray:
    """[n]: each image's size under zlib (level 9) in bits per pixel, a generic compressor's estimate of
    its complexity. Subtracting it from a model's bits/dim gives the input-complexity score of Serrà et al.
    2020, which stops smooth or blank images from looking "more normal" than the training data."""
    return np.array([len(zlib.compress(np.ascontiguousarray(im).tobytes(), 9)) * 8 / im.size for im in images])
