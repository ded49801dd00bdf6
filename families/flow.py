"""Normalizing flow: a class-conditional multi-scale RealNVP (Dinh et al. 2017) over dequantized,
logit-transformed pixels; exact log-likelihood and one-pass sampling."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from families.common import NUM_CLASS_IDS, dequantize, drop_classes, from_unit

LOGIT_ALPHA = 0.05  # squashes [0,1] into [a, 1-a] before the logit, so the logit stays finite (RealNVP)


@dataclass
class Config:
    image_size: int = 28        # any multiple of 4: two squeezes
    hidden: int = 48            # channels of each coupling network
    couplings_per_stage: int = 3
    class_dim: int = 8          # class embedding channels fed to every coupling network
    class_dropout: float = 0.1
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> (B,4C,H/2,W/2): each 2x2 patch becomes four channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


def checkerboard(channels: int, size: int, parity: int) -> torch.Tensor:
    idx = torch.arange(size)
    board = ((idx[:, None] + idx[None, :]) % 2 == parity).float()
    return board.expand(1, channels, size, size).clone()


def channel_mask(channels: int, size: int, parity: int) -> torch.Tensor:
    mask = torch.zeros(1, channels, 1, 1)
    mask[:, :channels // 2] = 1.0
    mask = mask if parity == 0 else 1.0 - mask
    return mask.expand(1, channels, size, size).clone()


class AffineCoupling(nn.Module):
    """y = m*x + (1-m)*(x*exp(s) + t), with (s, t) computed from m*x and the class: invertible,
    with log|det J| = sum((1-m)*s)."""

    def __init__(self, mask: torch.Tensor, hidden: int, class_dim: int):
        super().__init__()
        c = mask.shape[1]
        self.register_buffer("mask", mask)
        self.class_emb = nn.Embedding(NUM_CLASS_IDS, class_dim)
        self.net = nn.Sequential(
            nn.Conv2d(c + class_dim, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * c, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)  # start as the identity map
        nn.init.zeros_(self.net[-1].bias)
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1))

    def _s_t(self, x_kept: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.class_emb(y)[:, :, None, None].expand(-1, -1, *x_kept.shape[2:])
        s, t = self.net(torch.cat([x_kept, cond], 1)).chunk(2, dim=1)
        inv = 1.0 - self.mask
        return self.scale * torch.tanh(s) * inv, t * inv  # tanh bounds the scales: stable training

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._s_t(x * self.mask, y)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s, t = self._s_t(z * self.mask, y)
        return (z - t) * torch.exp(-s)


class Scale(nn.Module):
    """Checkerboard couplings at (C,H,W), squeeze, channel couplings at (4C,H/2,W/2)."""

    def __init__(self, channels: int, size: int, c: Config):
        super().__init__()
        n = c.couplings_per_stage
        self.spatial = nn.ModuleList(AffineCoupling(checkerboard(channels, size, i % 2), c.hidden, c.class_dim)
                                     for i in range(n))
        self.channel = nn.ModuleList(AffineCoupling(channel_mask(4 * channels, size // 2, i % 2), c.hidden,
                                                    c.class_dim) for i in range(n))

    def forward(self, x, y):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.spatial:
            x, ld = layer(x, y)
            logdet = logdet + ld
        x = squeeze(x)
        for layer in self.channel:
            x, ld = layer(x, y)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z, y):
        for layer in reversed(self.channel):
            z = layer.inverse(z, y)
        z = unsqueeze(z)
        for layer in reversed(self.spatial):
            z = layer.inverse(z, y)
        return z


class RealNVP(nn.Module):
    """Two scales, each factoring out half its channels as Gaussian latents, then final couplings."""

    def __init__(self, config: Config):
        super().__init__()
        s = config.image_size
        if s % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {s}")
        self.image_size = s
        self.scale1 = Scale(1, s, config)                  # (1,s,s) -> (4,s/2,s/2), factor out 2
        self.scale2 = Scale(2, s // 2, config)             # (2,s/2,s/2) -> (8,s/4,s/4), factor out 4
        self.final = nn.ModuleList(
            AffineCoupling(m, config.hidden, config.class_dim)
            for m in (checkerboard(4, s // 4, 0), checkerboard(4, s // 4, 1),
                      channel_mask(4, s // 4, 0), channel_mask(4, s // 4, 1)))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Logit-space x (B,1,s,s) -> latents [(B,2,s/2,s/2), (B,4,s/4,s/4), (B,4,s/4,s/4)], log|det J|."""
        h, logdet = self.scale1(x, y)
        z1, h = h.chunk(2, dim=1)
        h, ld = self.scale2(h, y)
        logdet = logdet + ld
        z2, h = h.chunk(2, dim=1)
        for layer in self.final:
            h, ld = layer(h, y)
            logdet = logdet + ld
        return [z1, z2, h], logdet

    def inverse(self, zs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        z1, z2, h = zs
        for layer in reversed(self.final):
            h = layer.inverse(h, y)
        h = self.scale2.inverse(torch.cat([z2, h], 1), y)
        return self.scale1.inverse(torch.cat([z1, h], 1), y)

    def log_prob(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact log density (B,) of continuous images u (B,1,s,s) in [0,1], including the logit transform."""
        p = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * u
        x = torch.log(p) - torch.log1p(-p)
        logit_logdet = (math.log(1 - 2 * LOGIT_ALPHA) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        zs, logdet = self(x, y)
        log_pz = sum((-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1) for z in zs)
        return log_pz + logdet + logit_logdet

    def bits_per_dim(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """-log2 p per dimension (B,) of 8-bit images given as continuous u = (x + noise) / 256."""
        d = u[0].numel()
        return -self.log_prob(u, y) / (d * math.log(2)) + 8.0  # [0,1) density -> 256-level probability

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        s = self.image_size
        return [(2, s // 2, s // 2), (4, s // 4, s // 4), (4, s // 4, s // 4)]

    def sample_from_latents(self, zs: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0,1]."""
        p = torch.sigmoid(self.inverse(zs, y))
        return ((p - LOGIT_ALPHA) / (1 - 2 * LOGIT_ALPHA)).clamp(0, 1)


class FlowTrainer:
    def __init__(self, model: RealNVP, config: Config):
        self.model, self.config = model, config
        self.modules = {"model": model}
        self.optimizers = {"opt": torch.optim.Adam(model.parameters(), lr=config.lr)}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        loss = self.model.bits_per_dim(dequantize(x), drop_classes(y, self.config.class_dropout)).mean()
        self.optimizers["opt"].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 100.0)
        self.optimizers["opt"].step()
        return {"bpd": loss.item()}

    def release(self) -> nn.Module:
        return self.model


def build(config: Config) -> RealNVP:
    return RealNVP(config)


def make_trainer(model: RealNVP, config: Config) -> FlowTrainer:
    return FlowTrainer(model, config)


# Sampling at a reduced temperature trades diversity for cleaner images (Kingma & Dhariwal 2018).
DEFAULT_SAMPLING = {"temperature": 0.7}


@torch.no_grad()
def sample(model: RealNVP, y: torch.Tensor, generator: torch.Generator, *, temperature: float = 0.7) -> torch.Tensor:
    zs = [temperature * torch.randn((y.shape[0], *shape), generator=generator) for shape in model.latent_shapes()]
    return from_unit(model.sample_from_latents(zs, y))
