"""VAE: a convolutional class-conditional VAE (Kingma & Welling 2014; Sohn et al. 2015).

The decoder is a Gaussian with a learned per-pixel scale over dequantized intensities, so its ELBO
is a true bound on the discrete log-likelihood, in bits/dim comparable with the flow and PixelCNN."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from families.common import NUM_CLASS_IDS, NUM_PIXELS, dequantize, drop_classes, from_unit


@dataclass
class Config:
    latent_dim: int = 8       # small on purpose: a roomy z also encodes the class, and samples then ignore y
    width: int = 32
    class_dim: int = 16       # class embedding width fed to both encoder head and decoder
    class_dropout: float = 0.1
    steps: int = 10000
    batch_size: int = 64
    lr: float = 1e-3


class Encoder(nn.Module):
    """q(z | x, y): x (B,1,28,28) in [0,1], y (B,) -> mu, logvar (B, Z)."""

    def __init__(self, c: Config):
        super().__init__()
        w = c.width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 4, 2, 1), nn.SiLU(),              # 14x14
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.SiLU(),          # 7x7
            nn.Flatten())
        self.class_emb = nn.Embedding(NUM_CLASS_IDS, c.class_dim)
        self.head = nn.Sequential(nn.Linear(2 * w * 49 + c.class_dim, 256), nn.SiLU(),
                                  nn.Linear(256, 2 * c.latent_dim))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(torch.cat([self.conv(x), self.class_emb(y)], 1)).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """p(x | z, y): z (B,Z), y (B,) -> mean (B,1,28,28) in [0,1]; the log-scale is a learned map."""

    def __init__(self, c: Config):
        super().__init__()
        w = c.width
        self.class_emb = nn.Embedding(NUM_CLASS_IDS, c.class_dim)
        self.fc = nn.Sequential(nn.Linear(c.latent_dim + c.class_dim, 256), nn.SiLU(),
                                nn.Linear(256, 2 * w * 49), nn.SiLU())
        self.deconv = nn.Sequential(
            nn.Unflatten(1, (2 * w, 7, 7)),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.SiLU(),    # 14x14
            nn.ConvTranspose2d(w, 1, 4, 2, 1))                   # 28x28
        self.log_scale = nn.Parameter(torch.full((1, 1, 28, 28), -2.0))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.deconv(self.fc(torch.cat([z, self.class_emb(y)], 1))))


class VAE(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.latent_dim = config.latent_dim
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def elbo_bits_per_dim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Negative ELBO of uint8 images x (B,1,28,28) in bits/dim (B,): an upper bound on -log2 p(x|y)/D."""
        u = dequantize(x)
        mu, logvar = self.encoder(u, y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        mean = self.decoder(z, y)
        log_scale = self.decoder.log_scale.clamp(min=-7.0)
        nll = (0.5 * ((u - mean) / log_scale.exp()) ** 2 + log_scale
               + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        # density on [0,1)^D -> probability of 256-level pixels: add D*log(256), i.e. 8 bits/dim
        return (nll + kl) / (NUM_PIXELS * math.log(2)) + 8.0


class VAETrainer:
    def __init__(self, model: VAE, config: Config):
        self.model, self.config = model, config
        self.modules = {"model": model}
        self.optimizers = {"opt": torch.optim.Adam(model.parameters(), lr=config.lr)}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        loss = self.model.elbo_bits_per_dim(x, drop_classes(y, self.config.class_dropout)).mean()
        self.optimizers["opt"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["opt"].step()
        return {"bpd": loss.item()}

    def release(self) -> nn.Module:
        return self.model


def build(config: Config) -> VAE:
    return VAE(config)


def make_trainer(model: VAE, config: Config) -> VAETrainer:
    return VAETrainer(model, config)


DEFAULT_SAMPLING: dict = {}


@torch.no_grad()
def sample(model: VAE, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Decoder means for z ~ N(0, I): the usual VAE sample (pixel noise would only add grain)."""
    z = torch.randn((y.shape[0], model.latent_dim), generator=generator)
    return from_unit(model.decoder(z, y))
