"""Autoregressive: a class-conditional Gated PixelCNN (van den Oord et al. 2016) whose pixel distribution
is a 256-way softmax or a discretized logistic mixture (PixelCNN++, Salimans et al. 2017): exact
likelihood, and sampling one pixel per forward pass."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.contracts import LEVELS
from core.samplers.autoregressive import guided_levels
from families.common import NULL_CLASS, NUM_CLASS_IDS, NUM_PIXELS, drop_classes


@dataclass
class Config:
    hidden: int = 32           # small: sampling costs one forward per pixel, 784 per image
    dilations: tuple[int, ...] = (1, 2, 1, 4, 1)  # receptive field grows fast without a blind spot
    class_dropout: float = 0.1
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-3
    # 0: a 256-way softmax per pixel. K > 0: a mixture of K discretized logistics (3K numbers per pixel),
    # which knows that nearby levels are alike, so it learns from fewer steps
    mixtures: int = 0


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


def mixture_log_probs(params: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log P(level v) under discretized logistic mixtures (PixelCNN++ for one channel): params (B, 3K, ...)
    = K mixture logits, K means in [-1, 1] units, K log-scales; v levels 0..255 broadcastable to
    (B, K, ...) -> (B, ...). Level v is the bin [x - 1/255, x + 1/255] around x = v / 127.5 - 1; the end
    levels take the tails."""
    logit_probs, means, log_scales = params.chunk(3, dim=1)
    log_scales = log_scales.clamp(min=-7.0)
    centered, inv_s = v / 127.5 - 1.0 - means, torch.exp(-log_scales)
    plus, minus = inv_s * (centered + 1 / 255), inv_s * (centered - 1 / 255)
    log_cdf_plus = plus - F.softplus(plus)                      # log sigmoid(plus): level 0 takes the left tail
    log_one_minus_cdf_min = -F.softplus(minus)                  # level 255 takes the right tail
    delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * centered                                      # a bin too narrow to difference: its density
    log_delta = torch.where(delta > 1e-5, torch.log(delta.clamp(min=1e-12)),
                            mid - log_scales - 2 * F.softplus(mid) - math.log(127.5))
    log_p = torch.where(v < 0.5, log_cdf_plus, torch.where(v > LEVELS - 1.5, log_one_minus_cdf_min, log_delta))
    return torch.logsumexp(log_p + torch.log_softmax(logit_probs, dim=1), dim=1)


class PixelCNN(nn.Module):
    """logits(x (B,1,28,28) uint8-valued, y (B,)) -> (B,256,28,28): the distribution of each pixel given
    the pixels above it and to its left (raster order) and the class."""

    def __init__(self, config: Config):
        super().__init__()
        c = config.hidden
        self.v_in = MaskedConv2d(1, c, vertical_mask(3, True))
        self.h_in = MaskedConv2d(1, c, horizontal_mask(3, True))
        self.layers = nn.ModuleList(GatedLayer(c, d) for d in config.dilations)
        self.mixtures = config.mixtures
        self.out = nn.Sequential(nn.ELU(), nn.Conv2d(c, c, 1), nn.ELU(),
                                 nn.Conv2d(c, 3 * config.mixtures if config.mixtures else LEVELS, 1))
        # rows above a pixel its logits can see: one through v_in, then each gated layer's dilation
        self.reach = 1 + sum(config.dilations)

    def features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The horizontal stack's output (B, hidden, H, W): everything the head reads at each pixel."""
        x = x.to(self.v_in.weight.dtype) / 127.5 - 1.0  # uint8 or float pixel values 0..255
        v, h = self.v_in(x), self.h_in(x)
        for layer in self.layers:
            v, h = layer(v, h, y)
        return h

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.logits(self.out(self.features(x, y)))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """The head's output (B, C, ...) -> log-probabilities, up to a constant, of the 256 levels (B, 256, ...)."""
        if not self.mixtures:
            return out
        levels = torch.arange(LEVELS, dtype=out.dtype, device=out.device)
        return mixture_log_probs(out.unsqueeze(2), levels.view(1, 1, LEVELS, *([1] * (out.dim() - 2))))

    def step(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """logits (B,256) of pixel p (B,) int64, a raster position, of each row: the sampling step. The head
        runs at that one pixel only, so a step neither computes nor returns 256 x 784 logits per row. x may
        hold only p's row and the `reach` rows above it (p then counts from x's first row): masking and
        the receptive field make the rest irrelevant."""
        h = self.features(x, y).flatten(2)                                     # (B, hidden, H*W)
        h = torch.gather(h, 2, p.view(-1, 1, 1).expand(-1, h.shape[1], 1))     # (B, hidden, 1)
        return self.logits(self.out(h[..., None])[:, :, 0, 0])

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact -log2 p(x|y) per dimension (B,) of uint8 images x (B,1,28,28)."""
        if self.mixtures:  # only at the true levels: 256x less work than the full logits
            nll = -mixture_log_probs(self.out(self.features(x, y)), x.to(self.v_in.weight.dtype))  # (B,28,28)
        else:
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


# Classifier-free guidance on the logits (class dropout taught the model p(x) too): on 40-sample screens
# it lifted class accuracy from 28% to 55-58% at s = 2-3 (T = 0.9-1); scales of 5 or more overshoot (under
# 45%), and T = 0.8 without guidance dropped it to 12%
DEFAULT_SAMPLING = {"temperature": 0.9, "guidance_scale": 2.0}


@torch.no_grad()
def sample(model: PixelCNN, y: torch.Tensor, generator: torch.Generator, *, temperature: float = 1.0,
           guidance_scale: float = 1.0) -> torch.Tensor:
    """Raster-order ancestral sampling, one forward per pixel, with the engine's maths: one uniform per
    image per pixel from `generator`, inverse CDF, classifier-free guidance on the logits. So the images
    of y = n copies of a class with generator seeded s are those the engine serves for (class, s, n).
    Pixel (i, j) depends only on rows i - reach .. i, so each forward runs on those rows only (a third
    of the work; its logits agree with the engine's whole-image forward to float rounding)."""
    b = y.shape[0]
    guided = guidance_scale != 1.0
    rows_y = torch.cat([y, torch.full_like(y, NULL_CLASS)]) if guided else y  # conditional, then null rows
    scale, temp = torch.full((b,), float(guidance_scale)), torch.full((b,), float(temperature))
    x = torch.zeros((b, 1, 28, 28))  # float levels, as the engine's
    for p in range(NUM_PIXELS):
        i, j = divmod(p, 28)
        top = max(0, i - model.reach)
        rows = x[:, :, top:i + 1]
        at = torch.full((len(rows_y),), p - top * 28)  # pixel p's position in the cropped rows
        logits = model.step(torch.cat([rows, rows]) if guided else rows, rows_y, at)
        # a null-class row's two forwards are the same, so its guided logits are its own (as the engine's)
        x[:, 0, i, j] = guided_levels(logits[:b], logits[b:] if guided else logits, scale, temp,
                                      torch.rand(b, generator=generator, dtype=torch.float64)).float()
    return x.to(torch.uint8)
