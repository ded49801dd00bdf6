"""VAE: a convolutional class-conditional VAE (Kingma & Welling 2014; Sohn et al. 2015).

The decoder gives every pixel a discretized logistic over the 256 intensities (Salimans et al. 2017),
with a mean and a scale per pixel and per image, so the ELBO is a bound on the 8-bit log-likelihood in
bits/dim, comparable with the flow and PixelCNN, and a dark background costs almost nothing to model."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from families.common import NUM_CLASS_IDS, NUM_PIXELS, drop_classes, from_unit, to_unit


@dataclass
class Config:
    latent_dim: int = 8       # small on purpose: a roomy z also encodes the class, and samples then ignore y
    width: int = 32
    class_dim: int = 16       # class embedding width fed to both encoder head and decoder
    class_dropout: float = 0.1
    # Training weight of the KL term (beta-VAE, Higgins et al. 2017). Above 1 it squeezes what y already
    # says (the class) out of z, so samples follow the requested class; reported ELBOs are always beta = 1.
    kl_weight: float = 3.0    # 3 beat 1 and 2 on class accuracy and FD (README); costs ~0.05 bits/dim of ELBO
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
    """p(x | z, y): z (B,Z), y (B,) -> per-pixel logistic mean in [0,1] and log-scale; forward() is the
    mean, the image a sample decodes to."""

    def __init__(self, c: Config):
        super().__init__()
        w = c.width
        self.class_emb = nn.Embedding(NUM_CLASS_IDS, c.class_dim)
        # the class also shifts the 7x7 feature map directly, so the decoder cannot learn to ignore it
        self.class_map = nn.Embedding(NUM_CLASS_IDS, 2 * w * 49)
        nn.init.zeros_(self.class_map.weight)
        self.fc = nn.Sequential(nn.Linear(c.latent_dim + c.class_dim, 256), nn.SiLU(),
                                nn.Linear(256, 2 * w * 49))
        self.deconv = nn.Sequential(
            nn.SiLU(), nn.Unflatten(1, (2 * w, 7, 7)),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.SiLU(),    # 14x14
            nn.ConvTranspose2d(w, 2, 4, 2, 1))                   # 28x28: mean logit, log-scale

    def distribution(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(torch.cat([z, self.class_emb(y)], 1)) + self.class_map(y)
        mean_logit, log_scale = self.deconv(h).chunk(2, dim=1)               # (B,1,28,28) each
        return torch.sigmoid(mean_logit), log_scale.clamp(min=-7.0)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distribution(z, y)[0]


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) per pixel for uint8 x under a logistic on [0,1] discretized into 256 bins; the end bins
    take the tails (PixelCNN++, Salimans et al. 2017)."""
    c = x.float() / 255.0
    half_bin = 0.5 / 255.0
    inv_s = torch.exp(-log_scale)
    plus = inv_s * (c - mean + half_bin)
    minus = inv_s * (c - mean - half_bin)
    log_cdf_plus = plus - F.softplus(plus)            # log sigmoid(plus): the x = 0 bin
    log_one_minus_cdf_minus = -F.softplus(minus)      # log(1 - sigmoid(minus)): the x = 255 bin
    mid = torch.log((torch.sigmoid(plus) - torch.sigmoid(minus)).clamp(min=1e-12))
    return torch.where(x == 0, log_cdf_plus, torch.where(x == 255, log_one_minus_cdf_minus, mid))


class VAE(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.latent_dim = config.latent_dim
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def elbo_bits_per_dim(self, x: torch.Tensor, y: torch.Tensor, kl_weight: float = 1.0) -> torch.Tensor:
        """Negative ELBO of uint8 images x (B,1,28,28) in bits/dim (B,): an upper bound on -log2 p(x|y)/D
        (with kl_weight 1; other weights give the beta-VAE training objective)."""
        mu, logvar = self.encoder(to_unit(x), y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        nll = -discretized_logistic_log_prob(x, *self.decoder.distribution(z, y)).flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (nll + kl_weight * kl) / (NUM_PIXELS * math.log(2))


class VAETrainer:
    def __init__(self, model: VAE, config: Config):
        self.model, self.config = model, config
        self.modules = {"model": model}
        self.optimizers = {"opt": torch.optim.Adam(model.parameters(), lr=config.lr)}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        loss = self.model.elbo_bits_per_dim(x, drop_classes(y, self.config.class_dropout),
                                            self.config.kl_weight).mean()
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
