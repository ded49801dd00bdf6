"""What every family shares: the image and class conventions, and the trainer interface."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from core.contracts import IMAGE_SHAPE, NULL_CLASS, NUM_CLASS_IDS, NUM_CLASSES, NUM_PIXELS  # noqa: F401 (re-exported)


def drop_classes(y: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each label by NULL_CLASS with probability p, so one network learns p(x|y) and p(x)."""
    return torch.where(torch.rand(y.shape) < p, torch.full_like(y, NULL_CLASS), y)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [0,1]."""
    return x.float() / 255.0


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0,255] -> float [-1,1]."""
    return x.float() / 127.5 - 1.0


def dequantize(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> continuous [0,1) by uniform noise inside each intensity bin, the standard way to turn a
    continuous density into a bound on the discrete likelihood (Theis et al. 2016)."""
    return (x.float() + torch.rand(x.shape)) / 256.0


def from_signed(x: torch.Tensor) -> torch.Tensor:
    """float [-1,1] -> uint8 images."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """float [0,1] -> uint8 images."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Trainer(Protocol):
    """One family's training recipe; families/train.py owns the loop, data order, seeding and checkpoints."""

    modules: dict[str, nn.Module]            # name -> module whose weights are saved for resume
    optimizers: dict[str, torch.optim.Optimizer]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Called once per training step with x (B,1,28,28) uint8 and y (B,) int64; returns losses to log."""
        ...

    def release(self) -> nn.Module:
        """Called after training: the module whose weights ship (e.g. the EMA copy)."""
        ...
