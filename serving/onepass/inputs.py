"""One-pass sampling around the forward: the graph's inputs for one request, drawn from the request's own
generator, and the graph's output as uint8 images. Pure numpy, no runtime: the batcher concatenates
these rows with other requests' and splits the outputs back, so a request's images never depend on
its batch-mates."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.contracts import BATCH, Domain, GraphContract


def draw_inputs(contract: GraphContract, class_id: int | Sequence[int], n: int, seed: int | Sequence[int],
                temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Inputs of a one-pass graph (gan.generate, vae.decode, flow.sample: z normal, y class) for n images:
    z = temperature * N(0, I) drawn from numpy's Generator(PCG64) seeded with `seed`, all n rows at once,
    so the same (seed, n) gives the same images whatever else is in the batch. n seeds instead give row i
    its own generator, and so the row that seeds[i] gives alone with n = 1; n class ids, row i its class."""
    rngs = [np.random.default_rng(seed)] if np.ndim(seed) == 0 else [np.random.default_rng(s) for s in seed]
    if len(rngs) not in (1, n) or np.size(class_id) not in (1, n):
        raise ValueError(f"draw_inputs: n = {n} images takes one seed and class id, or n of them")
    feeds: dict[str, np.ndarray] = {}
    for spec in contract.inputs:
        if spec.domain is Domain.NORMAL:  # each generator draws its rows of every input in turn, as with n = 1
            shape = spec.concrete_shape(n // len(rngs))
            z = np.concatenate([rng.standard_normal(shape, dtype=np.float32) for rng in rngs])  # [n, z_dim]
            feeds[spec.name] = z * np.float32(temperature) if temperature != 1.0 else z
        elif spec.domain is Domain.CLASS_ID:
            feeds[spec.name] = np.broadcast_to(np.asarray(class_id, np.int64), spec.concrete_shape(n)).copy()  # [n]
        else:
            raise ValueError(f"{contract.key}: input {spec.name} ({spec.domain.value}) is not a one-pass input")
    return feeds


def to_images(contract: GraphContract, x: np.ndarray) -> np.ndarray:
    """The graph's image output [n, 1, 28, 28] float -> uint8 [n, 28, 28], as families.common's
    from_signed / from_unit (clamp, scale, round half to even like torch.round)."""
    spec = contract.outputs[0]
    if spec.shape[0] != BATCH or len(spec.shape) != 4 or spec.shape[1] != 1:
        raise ValueError(f"{contract.key}: output {spec.name} {spec.shape} is not a [B, 1, H, W] image")
    if spec.domain is Domain.SIGNED:
        scaled = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
    elif spec.domain is Domain.UNIT:
        scaled = np.clip(x, 0.0, 1.0) * 255.0
    else:
        raise ValueError(f"{contract.key}: output domain {spec.domain.value} is not an image")
    return np.rint(scaled).astype(np.uint8)[:, 0]
