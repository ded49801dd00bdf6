"""The Fashion-MNIST classifier behind every quality metric: its penultimate features define the
Fréchet distance, precision/recall and diversity; its predictions define class accuracy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from families.common import to_unit


@dataclass
class Config:
    width: int = 32          # channels of the first block; the second has twice as many
    features: int = 256      # penultimate feature size (the FD embedding)
    dropout: float = 0.3
    steps: int = 4700        # ~5 epochs at batch 64: enough for >92% test accuracy
    batch_size: int = 64
    lr: float = 1e-3


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.MaxPool2d(2),
    )


class Classifier(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        w = config.width
        self.body = nn.Sequential(_block(1, w), _block(w, 2 * w), nn.Flatten(),    # (B, 2w*7*7)
                                  nn.Linear(2 * w * 49, config.features), nn.ReLU())
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.features, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B,1,28,28) uint8 -> (B, features) float."""
        return self.body(to_unit(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class ClassifierTrainer:
    def __init__(self, model: Classifier, config: Config):
        self.model = model
        self.modules = {"model": model}
        self.optimizers = {"opt": torch.optim.Adam(model.parameters(), lr=config.lr)}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        # Random horizontal flips: garments are left-right symmetric, and it buys ~0.5% accuracy.
        flip = torch.rand(x.shape[0]) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(self.model(x), y)
        self.optimizers["opt"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["opt"].step()
        return {"loss": loss.item()}

    def release(self) -> nn.Module:
        return self.model


def build(config: Config) -> Classifier:
    return Classifier(config)


def make_trainer(model: Classifier, config: Config) -> ClassifierTrainer:
    return ClassifierTrainer(model, config)
