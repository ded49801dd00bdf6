"""`genserve evaluate`: sample quality and likelihood of a trained family, measured with no network.

Every feature-space metric uses the penultimate layer of the classifier trained here
(checkpoints/classifier), the Fashion-MNIST stand-in for the Inception network of FID.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from core.settings import SamplingSetting
from families import metrics
from families.checkpoint import CHECKPOINT_ROOT, load_card, load_model, save_json, CARD_FILE
from families.common import NUM_CLASSES, NULL_CLASS, dequantize
from families.data import load_split
from families.registry import FAMILIES, get_family

# PixelCNN draws one forward pass per pixel (784 per image), so it is judged on fewer samples.
DEFAULT_SAMPLES = {"pixelcnn": 128}
SAMPLE_BATCH = 64  # the batch size of the README's sampling-time column
FULL_SAMPLES = 10_000
FEATURE_BATCH = 1000


@dataclass
class Evaluation:
    family: str
    setting: dict[str, Any]     # sampling settings evaluated (sampler, steps, temperature, ...)
    metrics: dict[str, Any]     # name -> value, as stored in the model card


def setting_key(setting: dict[str, Any]) -> str:
    """The name a setting's metrics are filed under in metrics.by_setting, e.g.
    'guidance_scale=2.0-sampler=dpmpp_2m-steps=20' or 'default': SamplingSetting.key, which the policy reads."""
    return SamplingSetting.from_dict(setting).key


@lru_cache(maxsize=1)
def classifier() -> torch.nn.Module:
    model, _ = load_model("classifier")
    return model


@torch.no_grad()
def classify(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N,1,28,28) -> (features (N,D) float64, predicted class (N,))."""
    net = classifier()
    feats, preds = [], []
    for chunk in images.split(FEATURE_BATCH):
        f = net.features(chunk)
        feats.append(f.double().numpy())
        preds.append(net.head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


@lru_cache(maxsize=2)
def real_features(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, predicted classes, true labels) of a real split."""
    data = load_split(split)
    feats, preds = classify(torch.from_numpy(data.images.copy()).unsqueeze(1))
    return feats, preds, data.labels


def evaluate_classifier() -> dict[str, Any]:
    """Test accuracy, and the real-vs-real floor of every feature metric (10k train vs the test set)."""
    test_f, test_pred, test_y = real_features("test")
    train_f, _, _ = real_features("train")
    floor = np.random.default_rng(0).choice(len(train_f), FULL_SAMPLES, replace=False)
    precision, recall = metrics.precision_recall(test_f, train_f[floor])
    return {
        "test_accuracy": round(metrics.class_accuracy(test_pred, test_y), 4),
        "fd_train_vs_test": round(metrics.frechet_distance_between(train_f[floor], test_f), 3),
        "precision_train_vs_test": round(precision, 4),
        "recall_train_vs_test": round(recall, 4),
        "diversity_ratio_train_vs_test": round(metrics.diversity_ratio(train_f[floor], test_f), 4),
    }


@torch.no_grad()
def generate(family: str, model: torch.nn.Module, num_samples: int, setting: dict[str, Any],
             seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """num_samples images with classes 0..9 in equal shares, drawn in batches of SAMPLE_BATCH
    -> (images uint8 (N,1,28,28), classes (N,), wall seconds per image)."""
    spec = get_family(family)
    y = torch.arange(num_samples) % NUM_CLASSES
    generator = torch.Generator().manual_seed(seed)
    images = []
    start = time.perf_counter()
    for chunk in tqdm(y.split(SAMPLE_BATCH), desc=f"sample {family}", unit="batch", mininterval=5.0):
        images.append(spec.sample(model, chunk, generator, **setting))
    return torch.cat(images), y, (time.perf_counter() - start) / num_samples


@torch.no_grad()
def bits_per_dim_on_test_set(family: str, model: torch.nn.Module, batch_size: int = 500) -> dict[str, float]:
    """Mean bits/dim of the test set: exact for flow (on dequantized data) and PixelCNN, the ELBO bound
    for the VAE; with the true class (conditional) and with the null class (unconditional p(x))."""
    data = load_split("test")
    x = torch.from_numpy(data.images.copy()).unsqueeze(1)
    y = torch.from_numpy(data.labels.copy())
    torch.manual_seed(0)  # dequantization and ELBO noise
    if family == "flow":
        measure = lambda xb, yb: model.bits_per_dim(dequantize(xb), yb)  # noqa: E731
    else:
        measure = model.bits_per_dim if family == "pixelcnn" else model.elbo_bits_per_dim
    out = {}
    for name, labels in (("conditional", y), ("unconditional", torch.full_like(y, NULL_CLASS))):
        values = [measure(xb, yb) for xb, yb in tqdm(list(zip(x.split(batch_size), labels.split(batch_size))),
                                                       desc=f"bits/dim {family} {name}", mininterval=5.0)]
        out[name] = round(torch.cat(values).mean().item(), 4)
    return out


def evaluate(family: str, *, num_samples: int | None = None, setting: dict[str, Any] | None = None,
             seed: int = 0) -> Evaluation:
    spec = get_family(family)
    model, _ = load_model(family)
    unknown = set(setting or {}) - set(spec.DEFAULT_SAMPLING)
    if unknown:
        raise ValueError(f"{family} takes no sampling setting {sorted(unknown)}; "
                         f"its settings are {sorted(spec.DEFAULT_SAMPLING) or 'none'}")
    setting = {**spec.DEFAULT_SAMPLING, **(setting or {})}
    num_samples = num_samples or DEFAULT_SAMPLES.get(family, FULL_SAMPLES)
    images, requested, seconds_per_image = generate(family, model, num_samples, setting, seed)
    fake_f, fake_pred = classify(images)
    real_f, _, _ = real_features("test")
    precision, recall = metrics.precision_recall(real_f, fake_f)
    diversity = metrics.diversity_ratio(fake_f, real_f)
    result: dict[str, Any] = {
        "num_samples": num_samples,
        "fd": round(metrics.frechet_distance_between(fake_f, real_f), 3),
        "class_accuracy": round(metrics.class_accuracy(fake_pred, requested.numpy()), 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "diversity_ratio": round(diversity, 4),
        "mode_collapse": bool(diversity < metrics.MODE_COLLAPSE_THRESHOLD),
        "seconds_per_image_b64": round(seconds_per_image, 5),
    }
    if family in ("flow", "pixelcnn", "vae"):
        result["bits_per_dim" if family != "vae" else "elbo_bits_per_dim"] = bits_per_dim_on_test_set(family, model)
    return Evaluation(family, setting, result)


def record(evaluation: Evaluation) -> None:
    """Store the metrics in the family's model card: top level for its default setting, and every
    evaluated setting under metrics.by_setting (the policy compares diffusion settings by these)."""
    directory = CHECKPOINT_ROOT / evaluation.family
    card = load_card(directory)
    by_setting = card["metrics"].get("by_setting", {})
    by_setting[setting_key(evaluation.setting)] = {"setting": evaluation.setting, **evaluation.metrics}
    default = {**get_family(evaluation.family).DEFAULT_SAMPLING}
    top = by_setting.get(setting_key(default), {})
    card["metrics"] = {**{k: v for k, v in top.items() if k != "setting"}, "by_setting": by_setting}
    save_json(directory / CARD_FILE, card)


def quality_table() -> str:
    """The README's quality table, read from the committed model cards."""
    cls = load_card(CHECKPOINT_ROOT / "classifier")["metrics"]
    rows = ["| family | parameters | samples | FD ↓ | class acc. ↑ | precision | recall | diversity ratio | "
            "bits/dim (test, cond / uncond) | s/image (torch, batch 64) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for family in FAMILIES:
        try:
            card = load_card(CHECKPOINT_ROOT / family)
        except FileNotFoundError:
            continue
        m = card["metrics"]
        if "fd" not in m:
            continue
        bpd = m.get("bits_per_dim") or m.get("elbo_bits_per_dim")
        bpd_text = "—" if bpd is None else (f"{bpd['conditional']:.3f} / {bpd['unconditional']:.3f}"
                                            + (" (ELBO bound)" if family == "vae" else ""))
        flag = " ⚠ < 0.8" if m["mode_collapse"] else ""  # flagged; for VAE/flow/PixelCNN it is blur, not GAN collapse
        rows.append(f"| {family} | {card['parameters']:,} | {m['num_samples']:,} | {m['fd']:.2f} | "
                    f"{m['class_accuracy']:.1%} | {m['precision']:.3f} | {m['recall']:.3f} | "
                    f"{m['diversity_ratio']:.3f}{flag} | {bpd_text} | {m['seconds_per_image_b64']:.4f} |")
    rows.append(f"| real train (floor) | — | 10,000 | {cls['fd_train_vs_test']:.2f} | "
                f"{cls['test_accuracy']:.1%} (classifier on test) | {cls['precision_train_vs_test']:.3f} | "
                f"{cls['recall_train_vs_test']:.3f} | {cls['diversity_ratio_train_vs_test']:.3f} | — | — |")
    return "\n".join(rows)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", nargs="?", choices=FAMILIES + ("classifier",),
                        help="family to evaluate (omit with --table)")
    parser.add_argument("--samples", type=int, default=None,
                        help=f"number of samples (default {FULL_SAMPLES:,}; PixelCNN {DEFAULT_SAMPLES['pixelcnn']})")
    parser.add_argument("--sampler", choices=("ddim", "dpmpp_2m"), help="diffusion sampler")
    parser.add_argument("--steps", type=int, help="diffusion sampling steps")
    parser.add_argument("--guidance-scale", type=float, help="diffusion classifier-free guidance scale")
    parser.add_argument("--temperature", type=float, help="flow / PixelCNN sampling temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="print only; leave the model card as it is")
    parser.add_argument("--table", action="store_true", help="print the quality table from the model cards")


def evaluate_command(args: argparse.Namespace) -> None:
    if args.table:
        print(quality_table())
        return
    if args.family is None:
        raise ValueError("name a family to evaluate, or pass --table")
    if args.family == "classifier":
        result = evaluate_classifier()
        if not args.no_record:
            card = load_card(CHECKPOINT_ROOT / "classifier")
            card["metrics"] = result
            save_json(CHECKPOINT_ROOT / "classifier" / CARD_FILE, card)
        print(json.dumps(result, indent=2))
        return
    setting = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps),
                                 ("guidance_scale", args.guidance_scale),
                                 ("temperature", args.temperature)) if v is not None}
    evaluation = evaluate(args.family, num_samples=args.samples, setting=setting, seed=args.seed)
    if not args.no_record:
        record(evaluation)
    print(json.dumps({"family": evaluation.family, "setting": evaluation.setting, **evaluation.metrics}, indent=2))
