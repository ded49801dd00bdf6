"""Weights on disk: safetensors for tensors, JSON for everything else; never pickle."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name


def save_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # no shared storage
    _atomic_write(path, lambda p: save_file(tensors, str(p)))


def save_model(directory: Path, module: nn.Module, card: dict[str, Any]) -> None:
    """Write the shipped weights and their model card (config, steps, data hash, metrics)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / WEIGHTS_FILE, module.state_dict())
    save_json(directory / CARD_FILE, card)


def load_card(directory: Path) -> dict[str, Any]:
    return json.loads((directory / CARD_FILE).read_text())


def load_model(family: str, directory: Path | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a family's module from its card's config and load the safetensors weights."""
    from families.registry import get_family

    directory = directory or CHECKPOINT_ROOT / family
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no trained {family} weights at {directory}; run `genserve train {family}`")
    card = load_card(directory)
    spec = get_family(family)
    model = spec.build(config_from_dict(spec.Config, card["config"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return model.eval(), card


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
    return cls(**kwargs)
