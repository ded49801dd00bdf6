"""`genserve train FAMILY`: one loop for every family — seeded, resumable, with a progress bar.

Determinism: the data order of epoch e is a permutation seeded by (seed, e), and the global RNG is
reseeded by (seed, step) before every step, so a run resumed at step k replays exactly what an
uninterrupted run does from k on, with no RNG state to save.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from families.checkpoint import (CHECKPOINT_ROOT, config_from_dict, config_to_dict, save_json,
                                 save_model, save_tensors)
from families.common import count_parameters
from families.data import load_split
from families.registry import get_family

RUN_ROOT = Path("runs")
STATE_FILE, STATE_META = "state.safetensors", "state.json"


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _batch_indices(seed: int, step: int, n: int, batch_size: int) -> torch.Tensor:
    per_epoch = n // batch_size
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(seed, -1 - epoch)))
    return perm[offset * batch_size:(offset + 1) * batch_size]


def save_state(run_dir: Path, trainer, step: int, meta: dict[str, Any]) -> None:
    """Everything needed to resume: module weights and optimizer moments as safetensors, the rest as JSON."""
    tensors, opt_meta = {}, {}
    for name, module in trainer.modules.items():
        tensors.update({f"module.{name}.{k}": v for k, v in module.state_dict().items()})
    for name, opt in trainer.optimizers.items():
        sd = opt.state_dict()
        scalars = {}
        for idx, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{name}.{idx}.{key}"] = value
                else:
                    scalars[f"{idx}.{key}"] = value
        opt_meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(run_dir / STATE_FILE, tensors)
    save_json(run_dir / STATE_META, {**meta, "step": step, "optimizers": opt_meta})


def load_state(run_dir: Path, trainer) -> dict[str, Any]:
    from safetensors.torch import load_file

    meta = json.loads((run_dir / STATE_META).read_text())
    tensors = load_file(str(run_dir / STATE_FILE))
    for name, module in trainer.modules.items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in trainer.optimizers.items():
        state: dict[int, dict[str, Any]] = {}
        prefix = f"opt.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, field = key[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[field] = value
        for key, value in meta["optimizers"][name]["scalars"].items():
            idx, field = key.split(".", 1)
            state.setdefault(int(idx), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": meta["optimizers"][name]["param_groups"]})
    return meta


def train(family: str, *, steps: int | None = None, seed: int = 0, out_dir: Path | None = None,
          run_dir: Path | None = None, overrides: dict[str, Any] | None = None,
          save_every: int = 500, progress: bool = True) -> dict[str, Any]:
    """Train `family` to `steps` (default: its Config's), resuming from run_dir when a state is there.

    Returns the model card written next to the weights in out_dir (default checkpoints/FAMILY)."""
    spec = get_family(family)
    config = config_from_dict(spec.Config, {**config_to_dict(spec.Config()), **(overrides or {})})
    if steps is not None:
        config.steps = steps
    out_dir = Path(out_dir) if out_dir else CHECKPOINT_ROOT / family
    run_dir = Path(run_dir) if run_dir else RUN_ROOT / family
    data = load_split("train")
    images = torch.from_numpy(data.images.copy()).unsqueeze(1)  # (N,1,28,28) uint8
    labels = torch.from_numpy(data.labels.copy())

    torch.manual_seed(seed)
    model = spec.build(config)
    trainer = spec.make_trainer(model, config)
    config_key = {k: v for k, v in config_to_dict(config).items() if k != "steps"}
    start, elapsed = 0, 0.0
    if (run_dir / STATE_META).is_file():
        meta = json.loads((run_dir / STATE_META).read_text())
        if meta["config"] == json.loads(json.dumps(config_key)) and meta["seed"] == seed:
            if meta["step"] > config.steps:
                raise ValueError(f"{run_dir} is already at step {meta['step']}, past the {config.steps} asked "
                                 f"for; ask for more steps or use another run folder")
            load_state(run_dir, trainer)
            start, elapsed = meta["step"], meta.get("train_seconds", 0.0)
        else:
            print(f"{run_dir} holds a run with another config or seed; starting afresh")

    for module in trainer.modules.values():
        module.train()
    logs: dict[str, float] = {}
    smoothed: dict[str, float] = {}
    t0 = time.time()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=f"train {family}",
               disable=not progress, mininterval=2.0)
    for step in bar:
        idx = _batch_indices(seed, step, images.shape[0], config.batch_size)
        torch.manual_seed(_step_seed(seed, step))
        logs = trainer.step(images[idx], labels[idx])
        smoothed = {k: 0.98 * smoothed.get(k, v) + 0.02 * v for k, v in logs.items()}
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in smoothed.items()})
        if (step + 1) % save_every == 0 or step + 1 == config.steps:
            save_state(run_dir, trainer, step + 1, {"config": config_key, "seed": seed,
                                                    "train_seconds": elapsed + time.time() - t0})
    bar.close()

    released = trainer.release().eval()
    card = {
        "family": family,
        "config": config_to_dict(config),
        "seed": seed,
        "training_steps": config.steps,
        "train_seconds": round(elapsed + time.time() - t0, 1),
        "final_losses": {k: round(v, 5) for k, v in smoothed.items()},
        "parameters": count_parameters(released),
        "data_sha256": data.sha256,
        "trained_on": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
                      f"threads={torch.get_num_threads()}".strip(),
        "metrics": {},  # filled in by `genserve evaluate`
    }
    save_model(out_dir, released, card)
    return card
