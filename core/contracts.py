"""Graph contracts: the single source of truth for what every exported graph takes and returns.

Serving reads these (from the manifest, or by importing this module) and never the torch code, so this
module imports only the standard library and numpy. A contract fixes tensor names, dtypes, shapes and
value domains; the leading axis is always the dynamic batch axis named BATCH.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

# The image, class and timestep conventions every layer shares: training, export, store and serving.
IMAGE_SIZE = 28
IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES          # the "no class" id: unconditional sampling and the CFG null branch
NUM_CLASS_IDS = NUM_CLASSES + 1   # embedding rows: the classes and NULL_CLASS
NUM_TRAIN_TIMESTEPS = 1000        # the diffusion model's training noise schedule length
LEVELS = 256                      # PixelCNN intensities

BATCH = "batch"                   # name of the dynamic leading axis in every graph
OPSET = 17

# flow.sample's latent is the RealNVP's three latents flattened (C order) and concatenated in this order;
# each entry is (name, shape without batch). Sizes add up to NUM_PIXELS.
FLOW_LATENTS = (("z1", (2, 14, 14)), ("z2", (4, 7, 7)), ("z3", (4, 7, 7)))


class Domain(str, Enum):
    """What values a tensor holds: inputs outside it are the caller's bug, outputs are promised in it."""

    NORMAL = "normal"        # float, standard-normal latent or noisy image (any real, mostly |v| < 4)
    UNIT = "unit"            # float in [0, 1]
    SIGNED = "signed"        # float in [-1, 1]
    LEVELS = "levels"        # float holding integers 0..255 (PixelCNN's uint8 image, as float32)
    CLASS_ID = "class_id"    # int64 0..NUM_CLASSES, NULL_CLASS meaning "no class"
    TIMESTEP = "timestep"    # int64 0..NUM_TRAIN_TIMESTEPS-1
    PIXEL = "pixel"          # int64 0..NUM_PIXELS-1, a raster position (row * 28 + column)
    REAL = "real"            # float, unbounded (logits, log-variances, bits/dim)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                            # numpy dtype name: "float32" or "int64"
    shape: tuple[int | str, ...]          # BATCH first, then fixed sizes
    domain: Domain
    doc: str = ""

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "domain": self.domain.value,
                "doc": self.doc}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), Domain(d["domain"]), d.get("doc", ""))


@dataclass(frozen=True)
class GraphContract:
    family: str
    graph: str                            # e.g. "decode"; the artifact is f"{graph}.onnx"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    doc: str = ""
    opset: int = OPSET

    @property
    def onnx_file(self) -> str:
        return f"{self.graph}.onnx"

    @property
    def key(self) -> str:
        return f"{self.family}.{self.graph}"

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "graph": self.graph, "file": self.onnx_file, "opset": self.opset,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "doc": self.doc}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphContract:
        return cls(d["family"], d["graph"], tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]), d.get("doc", ""), d.get("opset", OPSET))


def _image(name: str, domain: Domain, doc: str = "") -> TensorSpec:
    return TensorSpec(name, "float32", (BATCH, *IMAGE_SHAPE), domain, doc)


def _class_id() -> TensorSpec:
    return TensorSpec("y", "int64", (BATCH,), Domain.CLASS_ID, f"class 0..{NUM_CLASSES - 1}, {NULL_CLASS} = no class")


def contracts_for(family: str, config: dict[str, Any]) -> list[GraphContract]:
    """The graphs serving needs from one family; sizes that vary by model (latent widths) come from the
    model card's config."""
    y = _class_id()
    if family == "gan":
        z_dim = int(config.get("z_dim", 64))
        return [GraphContract("gan", "generate",
                              (TensorSpec("z", "float32", (BATCH, z_dim), Domain.NORMAL, "z ~ N(0, I)"), y),
                              (_image("x", Domain.SIGNED, "image in [-1, 1]"),),
                              "one-pass sample from the generator")]
    if family == "vae":
        z_dim = int(config.get("latent_dim", 16))
        latent = TensorSpec("z", "float32", (BATCH, z_dim), Domain.NORMAL, "z ~ N(0, I)")
        return [
            GraphContract("vae", "decode", (latent, y), (_image("x", Domain.UNIT, "decoder mean in [0, 1]"),),
                          "p(x|z,y) mean: the usual VAE sample"),
            GraphContract("vae", "encode", (_image("x", Domain.UNIT, "image in [0, 1]"), y),
                          (TensorSpec("mu", "float32", (BATCH, z_dim), Domain.REAL),
                           TensorSpec("logvar", "float32", (BATCH, z_dim), Domain.REAL)),
                          "q(z|x,y): for reconstructions and latent edits"),
        ]
    if family == "flow":
        if int(config.get("image_size", 28)) != IMAGE_SHAPE[-1]:
            raise ValueError(f"flow contracts assume image_size {IMAGE_SHAPE[-1]}, got {config.get('image_size')}")
        order = ", ".join(f"{n}{list(s)}" for n, s in FLOW_LATENTS)
        return [
            GraphContract("flow", "sample",
                          (TensorSpec("z", "float32", (BATCH, NUM_PIXELS), Domain.NORMAL,
                                      f"temperature * N(0, I); latents flattened and concatenated: {order}"), y),
                          (_image("x", Domain.UNIT, "image in [0, 1]"),),
                          "inverse flow; the caller scales z by the sampling temperature"),
            GraphContract("flow", "log_prob",
                          (_image("x", Domain.UNIT, "dequantized image (x_uint8 + u) / 256, u ~ U[0,1)"), y),
                          (TensorSpec("bits_per_dim", "float32", (BATCH,), Domain.REAL,
                                      "-log2 p(x|y) / 784 of the 8-bit image"),),
                          "exact likelihood in bits/dim"),
        ]
    if family == "pixelcnn":
        # Full 28x28 images only: a step-batched server mixes requests at different pixels in one forward.
        # Out: each pixel's mixture of K discretized logistics as its parameters, well-conditioned numbers
        # whose 256 log-probabilities serving computes in float64 (core.samplers.autoregressive).
        x = _image("x", Domain.LEVELS, "uint8 intensities 0..255 as float32")
        k = int(config.get("mixtures", 5))
        mixture = (f"{k} mixture logits, {k} means (of level / 127.5 - 1), {k} log-scales of discretized "
                   "logistics")
        return [GraphContract("pixelcnn", "step",
                              (x, y, TensorSpec("p", "int64", (BATCH,), Domain.PIXEL,
                                                f"raster position 0..{NUM_PIXELS - 1} of the pixel to read, per row")),
                              (TensorSpec("mixture", "float32", (BATCH, 3 * k), Domain.REAL,
                                          f"p(pixel p | pixels before p, y): {mixture}"),),
                              "one autoregressive step: the distribution of each row's pixel p only"),
                GraphContract("pixelcnn", "logits", (x, y),
                              (TensorSpec("mixture", "float32", (BATCH, 3 * k, *IMAGE_SHAPE[1:]), Domain.REAL,
                                          f"p(pixel | pixels before it, y) at every pixel: {mixture}"),),
                              "every pixel's distribution in one teacher-forced forward: the exact likelihood")]
    if family == "diffusion":
        return [GraphContract("diffusion", "denoise",
                              (_image("x", Domain.NORMAL, "noisy image x_t"),
                               TensorSpec("t", "int64", (BATCH,), Domain.TIMESTEP,
                                          f"training timestep 0..{NUM_TRAIN_TIMESTEPS - 1}, per sample"), y),
                              (_image("eps", Domain.NORMAL, "predicted noise"),),
                              "epsilon prediction; CFG puts conditional and null-class rows in one batch")]
    raise ValueError(f"no graph contracts for family {family!r}")


def sample_inputs(contract: GraphContract, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs inside each input's domain: what parity checks, latency profiles and benchmarks feed."""
    out: dict[str, np.ndarray] = {}
    for spec in contract.inputs:
        shape = spec.concrete_shape(batch)
        if spec.domain is Domain.CLASS_ID:
            v = rng.integers(0, NULL_CLASS + 1, shape)
        elif spec.domain is Domain.TIMESTEP:
            v = rng.integers(0, NUM_TRAIN_TIMESTEPS, shape)
        elif spec.domain is Domain.PIXEL:
            v = rng.integers(0, NUM_PIXELS, shape)
        elif spec.domain is Domain.UNIT:
            v = rng.random(shape)
        elif spec.domain is Domain.SIGNED:
            v = rng.uniform(-1.0, 1.0, shape)
        elif spec.domain is Domain.LEVELS:
            v = rng.integers(0, LEVELS, shape)
        else:
            v = rng.standard_normal(shape)
        out[spec.name] = np.ascontiguousarray(v, dtype=spec.dtype)
    return out


def markdown_table(config_by_family: dict[str, dict[str, Any]] | None = None) -> str:
    """The contracts as a markdown table, for docs: `python -m core.contracts` (the shipped models' configs)."""
    def fmt(t: TensorSpec) -> str:
        return f"{t.name} [{','.join('B' if d == BATCH else str(d) for d in t.shape)}] {t.dtype} ({t.domain.value})"

    rows = ["| family | graph | inputs | outputs |", "|---|---|---|---|"]
    for family in ("gan", "vae", "flow", "pixelcnn", "diffusion"):
        for c in contracts_for(family, (config_by_family or {}).get(family, {})):
            rows.append(f"| {family} | {c.graph} | {'; '.join(map(fmt, c.inputs))} | {'; '.join(map(fmt, c.outputs))} |")
    return "\n".join(rows)


def _shipped_configs() -> dict[str, dict[str, Any]]:
    """The configs in the committed model cards (checkpoints/<family>/card.json), where present."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "checkpoints"
    return {f: json.loads((root / f / "card.json").read_text())["config"]
            for f in ("gan", "vae", "flow", "pixelcnn", "diffusion") if (root / f / "card.json").is_file()}


if __name__ == "__main__":
    print(markdown_table(_shipped_configs()))
