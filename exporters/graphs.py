"""Torch side of the contracts: one nn.Module per graph whose forward(*inputs) matches the contract's
inputs and outputs exactly, so export, parity checks and benchmarks all trace the same thing."""
from __future__ import annotations

import torch
from torch import nn

from core.contracts import (BATCH, FLOW_LATENTS, IMAGE_SHAPE, NUM_CLASSES, Domain, GraphContract, TensorSpec,
                            contracts_for)

# The cascade's judge (serving/judge/): the committed classifier as a graph. Not a generative family, so its
# contract lives here beside its wrapper rather than in core.contracts' table of what the families sample.
CLASSIFY = GraphContract(
    "classifier", "classify",
    (TensorSpec("x", "float32", (BATCH, *IMAGE_SHAPE), Domain.UNIT, "image in [0, 1]: uint8 / 255"),),
    (TensorSpec("logits", "float32", (BATCH, NUM_CLASSES), Domain.REAL, "unnormalized log p(class | x)"),),
    "class logits: the cascade judge's softmax (float64, in serving) is its confidence in the class asked for")


def graph_contracts(family: str, config: dict) -> list[GraphContract]:
    """Every graph one checkpoint exports: the families' (core.contracts) and the classifier's."""
    return [CLASSIFY] if family == "classifier" else contracts_for(family, config)


class FlowSample(nn.Module):
    """flow.sample: z (B,784) -> the three RealNVP latents (FLOW_LATENTS order) -> image (B,1,28,28) in [0,1]."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sizes = [c * h * w for _, (c, h, w) in FLOW_LATENTS]
        parts = torch.split(z, sizes, dim=1)
        zs = [p.reshape(-1, *shape) for p, (_, shape) in zip(parts, FLOW_LATENTS)]
        return self.flow.sample_from_latents(zs, y)


class FlowLogProb(nn.Module):
    """flow.log_prob: continuous x (B,1,28,28) in [0,1] -> bits/dim (B,)."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.flow.bits_per_dim(x, y)


class PixelCNNStep(nn.Module):
    """pixelcnn.step: x (B,1,28,28), y (B,), p (B,) -> mixture parameters (B,3K) of each row's pixel p."""

    def __init__(self, pixelcnn: nn.Module):
        super().__init__()
        self.pixelcnn = pixelcnn

    def forward(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.pixelcnn.step(x, y, p)


class Classify(nn.Module):
    """classifier.classify: x (B,1,28,28) in [0,1] -> logits (B,10). Takes the unit image (contracts carry no
    uint8) and so skips to_unit's /255: serving's uint8 / 255 is training's input exactly. Logits, not
    probabilities: a float32 softmax rounds confident scores to exactly 1.0, where no threshold separates them."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.classifier
        return c.head(c.dropout(c.body(x)))


def graph_module(contract: GraphContract, model: nn.Module) -> nn.Module:
    """The module to export for one contract, given the family's shipped module (from load_model)."""
    key = contract.key
    if key == "gan.generate":
        return model
    if key == "vae.decode":
        return model.decoder
    if key == "vae.encode":
        return model.encoder
    if key == "flow.sample":
        if [tuple(s) for s in model.latent_shapes()] != [s for _, s in FLOW_LATENTS]:
            raise ValueError(f"flow latent shapes {model.latent_shapes()} differ from the contract's")
        return FlowSample(model)
    if key == "flow.log_prob":
        return FlowLogProb(model)
    if key == "pixelcnn.step":
        return PixelCNNStep(model)
    if key == "classifier.classify":
        return Classify(model)
    if key in ("pixelcnn.logits", "diffusion.denoise"):
        return model
    raise ValueError(f"no torch module for graph {key}")
