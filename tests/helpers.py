"""Shared test helpers, and the constants of the served test app (tests/conftest.py)."""
from __future__ import annotations

import socket
from pathlib import Path

import torch

from families.checkpoint import config_to_dict, save_model
from families.registry import get_family
from genserve.cli import build_parser

SERVED_FAMILIES = ("gan", "vae", "flow", "diffusion", "pixelcnn")
ONE_PASS = ("gan", "vae", "flow")
SMALL = {"gan": dict(g_width=16, z_dim=32), "vae": dict(width=8, latent_dim=4),
         "flow": dict(hidden=8, couplings_per_stage=1), "diffusion": dict(channels=(8, 16, 16), emb_dim=16),
         "pixelcnn": dict(hidden=8, dilations=(1, 2))}
MAX_BATCH = 8          # the test config's max_batch_images: n = 16 spans two batches
MAX_WAIT_MS = 20       # long enough that concurrent requests surely meet in a batch
APP = "genserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_checkpoint(root: Path, family: str) -> Path:
    """A small random model of the family, saved as a checkpoint: for stores where none is trained."""
    spec = get_family(family)
    config = spec.Config(**SMALL[family])
    torch.manual_seed(0)
    card = {"family": family, "config": config_to_dict(config), "training_steps": 0, "metrics": {}}
    save_model(root / family, spec.build(config).eval(), card)
    return root / family


def run_cli(*argv: str) -> None:
    """Run a `genserve` command in-process; errors raise instead of becoming exit codes."""
    args = build_parser().parse_args(list(argv))
    args.func(args)
