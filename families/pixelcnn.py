"""Autoregressive: a class-conditional Gated PixelCNN (van den Oord et al. 2016) with a 256-way softmax
per pixel: exact likelihood, and sampling one pixel per forward pass."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.contracts import LEVELS
from families.common import NUM_CLASS_IDS, NUM_PIXELS, drop_classes


@dataclass
class Config:
    hidden: int = 32           # small: sampling costs one forward per pixel, 784 per image
    dilations: tuple[int, ...] = (1, 2, 1, 4, 1)  # receptive field grows fast without a blind spot
    class_dropout: float = 0.1
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-3


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 mask on every call."""

    def __init__(self, c_in: int, c_out: int, mask: torch.Tensor, dilation: int = 1):
        kh, kw = mask.shape
        super().__init__(c_in, c_out, (kh, kw), dilation=dilation,
                         padding=(dilation * (kh - 1) // 2, dilation * (kw - 1) // 2))
        self.register_buffer("mask", mask[None, None].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def vertical_mask(k: int, mask_center: bool) -> torch.Tensor:
    """Rows above the centre (and the centre row unless mask_center): the vertical stack never sees
    the current row's future, and with mask_center not even the current row."""
    mask = torch.ones(k, k)
    mask[k // 2 + 1:] = 0
    if mask_center:
        mask[k // 2] = 0
    return mask


def horizontal_mask(k: int, mask_center: bool) -> torch.Tensor:
    """Pixels to the left in the same row (and the centre unless mask_center)."""
    mask = torch.ones(1, k)
    mask[0, k // 2 + 1:] = 0
    if mask_center:
        mask[0, k // 2] = 0
    return mask


class GatedLayer(nn.Module):
    """One gated layer: tanh(a) * sigmoid(b) on both stacks, the vertical feeding the horizontal,
    the class added as a bias to both (the conditional Gated PixelCNN)."""

    def __init__(self, c: int, dilation: int):
        super().__init__()
        self.v = MaskedConv2d(c, 2 * c, vertical_mask(3, False), dilation)
        self.h = MaskedConv2d(c, 2 * c, horizontal_mask(3, False), dilation)
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.class_v = nn.Embedding(NUM_CLASS_IDS, 2 * c)
        self.class_h = nn.Embedding(NUM_CLASS_IDS, 2 * c)

    def forward(self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_feat = self.v(v) + self.class_v(y)[:, :, None, None]
        v_a, v_b = v_feat.chunk(2, dim=1)
        h_feat = self.h(h) + self.v_to_h(v_feat) + self.class_h(y)[:, :, None, None]
        h_a, h_b = h_feat.chunk(2, dim=1)
        return torch.tanh(v_a) * torch.sigmoid(v_b), h + self.h_out(torch.tanh(h_a) * torch.sigmoid(h_b))


class PixelCNN(nn.Module):
    """logits(x (B,1,28,28) uint8-valued, y (B,)) -> (B,256,28,28): the distribution of each pixel given
    the pixels above it and to its left (raster order) and the class."""

    def __init__(self, config: Config):
        super().__init__()
        c = config.hidden
        self.v_in = MaskedConv2d(1, c, vertical_mask(3, True))
        self.h_in = MaskedConv2d(1, c, horizontal_mask(3, True))
        self.layers = nn.ModuleList(GatedLayer(c, d) for d in config.dilations)
        self.out = nn.Sequential(nn.ELU(), nn.Conv2d(c, c, 1), nn.ELU(), nn.Conv2d(c, LEVELS, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.v_in.weight.dtype) / 127.5 - 1.0  # uint8 or float pixel values 0..255
        v, h = self.v_in(x), self.h_in(x)
        for layer in self.layers:
            v, h = layer(v, h, y)
        return self.out(h)

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact -log2 p(x|y) per dimension (B,) of uint8 images x (B,1,28,28)."""
        nll = F.cross_entropy(self(x, y), x[:, 0].long(), reduction="none")   # (B,28,28) nats
        return nll.flatten(1).sum(1) / (NUM_PIXELS * math.log(2))


class PixelCNNTrainer:
    def __init__(self, model: PixelCNN, config: Config):
        self.model, self.config = model, config
        self.modules = {"model": model}
        self.optimizers = {"opt": torch.optim.Adam(model.parameters(), lr=config.lr)}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        loss = self.model.bits_per_dim(x, drop_classes(y, self.config.class_dropout)).mean()
        self.optimizers["opt"].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizers["opt"].step()
        return {"bpd": loss.item()}

    def release(self) -> nn.Module:
        return self.model


def build(config: Config) -> PixelCNN:
    return PixelCNN(config)


def make_trainer(model: PixelCNN, config: Config) -> PixelCNNTrainer:
    return PixelCNNTrainer(model, config)


DEFAULT_SAMPLING = {"temperature": 1.0}


@torch.no_grad()
def sample(model: PixelCNN, y: torch.Tensor, generator: torch.Generator, *, temperature: float = 1.0) -> torch.Tensor:
    """Raster-order ancestral sampling, one forward per pixel. Row i depends only on rows <= i, so each
    forward runs on the rows so far only (half the work of full-image passes, same result)."""
    x = torch.zeros((y.shape[0], 1, 28, 28), dtype=torch.uint8)
    for i in range(28):
        for j in range(28):
            logits = model(x[:, :, :i + 1], y)[:, :, i, j] / temperature      # (B, 256)
            x[:, 0, i, j] = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0].to(torch.uint8)
    return x
