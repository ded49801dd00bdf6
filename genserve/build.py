"""`genserve build`: committed checkpoints -> ONNX graphs -> parity check -> store versions.

Idempotent: a version's name derives from the checkpoint's hash (and the export format), so a second
build finds every version present and only makes sure `latest` points at it. Quality metrics come from
the model card (`genserve evaluate` wrote them); nothing is re-evaluated here.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime as ort
import torch

from core.runtime import choose_providers, make_session
from core.settings import SamplingSetting
from exporters.onnx_export import PARITY_ATOL, export_family
from exporters.profile import batch_ladder, machine_info, measure_latency
from families.checkpoint import CARD_FILE, CHECKPOINT_ROOT, WEIGHTS_FILE, load_card, load_model
from families.registry import FAMILIES, get_family
from model_store import (DEFAULT_ALIAS, ExportInfo, LatencyProfile, Manifest, ModelStore, SamplingSettings,
                         SourceCheckpoint, VersionExists)

# Bump when the exporter changes what ships (opset, graph wrappers, optimization): the same checkpoint then
# builds a new version instead of colliding with an immutable old one.
EXPORT_FORMAT = "genserve-onnx-1"
MAX_BATCH = 64     # top of the latency profile; the one-pass deployments batch up to this

# The cascade's judge (serving/judge): the committed classifier (checkpoints/classifier), published beside
# the generative models under this name. `genserve build` publishes it with them.
JUDGE = "judge"
BUILDS = FAMILIES + (JUDGE,)   # what `genserve build` publishes by default: model name = checkpoint folder,
                               # but the judge's, which is checkpoints/classifier

# The sampler settings the policy may pick per family: the family default first, then the candidates it
# trades quality against latency with. Guidance stays at the default; steps are the latency lever.
_DIFFUSION_ALLOWED = [{"sampler": "dpmpp_2m", "steps": s} for s in (10, 15, 20, 25)] + \
                     [{"sampler": "ddim", "steps": s} for s in (25, 50)]


def sampling_settings(family: str) -> SamplingSettings:
    if family == "classifier":
        return SamplingSettings()  # it samples nothing
    default = SamplingSetting.from_dict(get_family(family).DEFAULT_SAMPLING)
    if family == "diffusion":
        allowed = [SamplingSetting(**s, guidance_scale=default.guidance_scale) for s in _DIFFUSION_ALLOWED]
    else:
        allowed = [default]      # gan/vae: nothing to choose; flow/pixelcnn: their default temperature
    return SamplingSettings(default=default, allowed=allowed)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_source(directory: Path) -> SourceCheckpoint:
    card = load_card(directory)
    weights, card_hash = _sha256_file(directory / WEIGHTS_FILE), _sha256_file(directory / CARD_FILE)
    return SourceCheckpoint(sha256=hashlib.sha256(f"{weights}:{card_hash}".encode()).hexdigest(),
                            weights_sha256=weights, card_sha256=card_hash, path=str(directory),
                            config=card["config"], training_steps=card.get("training_steps"))


def version_for(source: SourceCheckpoint) -> str:
    """First 12 hex of sha256(export format, checkpoint hash): same checkpoint and exporter, same version.
    The card is part of the hash, so new metrics from `genserve evaluate` make a new version."""
    return hashlib.sha256(f"{EXPORT_FORMAT}:{source.sha256}".encode()).hexdigest()[:12]


@dataclass
class BuildResult:
    model: str
    version: str | None
    status: str                # "published" | "current" | "skipped"
    detail: str
    seconds: float


def _ensure_aliases(store: ModelStore, model: str, version: str, aliases: tuple[str, ...]) -> list[str]:
    moved = []
    current = store.aliases(model)
    for alias in aliases:
        if current.get(alias) != version:
            store.set_alias(model, alias, version)
            moved.append(alias)
    return moved


def publish_checkpoint(store: ModelStore, directory: Path, *, model: str | None = None, version: str | None = None,
                       aliases: tuple[str, ...] = (DEFAULT_ALIAS,), max_batch: int = MAX_BATCH,
                       threads: int | None = None, log: Callable[[str], None] = print) -> BuildResult:
    """Export, check and publish one checkpoint folder (model.safetensors + card.json) as model@version
    (defaults: the card's family, and the checkpoint-derived version); no-op if that version exists."""
    t0 = time.perf_counter()
    directory = Path(directory)
    card = load_card(directory)
    family = card["family"]
    source = checkpoint_source(directory)
    model = model or family
    version = version or version_for(source)
    if store.has_version(model, version):
        moved = _ensure_aliases(store, model, version, aliases)
        note = f"; moved {', '.join(moved)}" if moved else ""
        return BuildResult(model, version, "current", f"{model}@{version} already in the store{note}",
                           time.perf_counter() - t0)

    threads = threads or torch.get_num_threads()
    module, card = load_model(family, directory)
    with tempfile.TemporaryDirectory(prefix=f"genserve-build-{model}-") as tmp:
        out = Path(tmp)
        log(f"{model}: exporting {family} checkpoint {source.sha256[:12]} as {model}@{version}")
        graphs = export_family(family, module, card["config"], out, threads=threads)
        for g in graphs:
            opt = g.optimization
            log(f"{model}: {g.contract.graph}: parity max abs err " +
                ", ".join(f"{e:.1e} @ batch {b}" for b, e in g.parity.items()) +
                (f"; ORT offline opt {opt.nodes_before}->{opt.nodes_after} nodes" if opt else ""))
        choice = choose_providers()
        batches = batch_ladder(max_batch)
        latency = {g.contract.graph: measure_latency(make_session(g.path, threads=threads, choice=choice),
                                                     g.contract, batches) for g in graphs}
        log(f"{model}: latency on {choice.providers[0]} " +
            "; ".join(f"{name} {ms[1]:.2f} ms @1, {ms[max_batch]:.1f} ms @{max_batch}" for name, ms in latency.items()))
        manifest = Manifest(
            model=model, version=version, family=family,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            graphs=[g.contract for g in graphs], sampling=sampling_settings(family),
            metrics=card.get("metrics") or {}, source=source,
            latency=LatencyProfile(machine=machine_info().to_dict(), provider=choice.providers[0],
                                   provider_reason=choice.reason, threads=threads,
                                   measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   ms_per_forward=latency),
            export=ExportInfo(opset=graphs[0].contract.opset,
                              tools={"torch": torch.__version__, "onnx": onnx.__version__,
                                     "onnxruntime": ort.__version__, "format": EXPORT_FORMAT},
                              parity_atol=PARITY_ATOL, parity={g.contract.graph: g.parity for g in graphs},
                              optimization={g.contract.graph: g.optimization.to_dict() for g in graphs
                                            if g.optimization}))
        try:
            store.publish(out, manifest, aliases=aliases)
        except VersionExists:  # a concurrent build published the same checkpoint first: same content
            _ensure_aliases(store, model, version, aliases)
            return BuildResult(model, version, "current", f"{model}@{version} published concurrently by another build",
                               time.perf_counter() - t0)
    return BuildResult(model, version, "published", f"published {model}@{version}" +
                       (f", {', '.join(aliases)} -> {version}" if aliases else ""), time.perf_counter() - t0)


def build(store: ModelStore, root: Path = CHECKPOINT_ROOT, families: tuple[str, ...] = BUILDS, *,
          max_batch: int = MAX_BATCH, log: Callable[[str], None] = print) -> list[BuildResult]:
    """Publish root/<family>/ for each family as model `family` (JUDGE: root/classifier/ as model JUDGE);
    families without weights are skipped."""
    results = []
    for family in families:
        directory = Path(root) / ("classifier" if family == JUDGE else family)
        if not (directory / WEIGHTS_FILE).is_file() or not (directory / CARD_FILE).is_file():
            result = BuildResult(family, None, "skipped", f"no checkpoint at {directory} "
                                 f"(run `genserve train {directory.name}`)", 0.0)
        else:
            result = publish_checkpoint(store, directory, model=family, max_batch=max_batch, log=log)
        log(f"{family}: {result.status}: {result.detail} ({result.seconds:.1f} s)")
        results.append(result)
    return results


def _build_command(args: argparse.Namespace) -> None:
    unknown = [f for f in args.families if f not in BUILDS]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {', '.join(BUILDS)}")
    store = ModelStore.open(args.store)
    t0 = time.perf_counter()
    results = build(store, args.checkpoints, tuple(args.families) or BUILDS, max_batch=args.max_batch)
    counts = {s: sum(r.status == s for r in results) for s in ("published", "current", "skipped")}
    print(f"build: {counts['published']} published, {counts['current']} current, {counts['skipped']} skipped "
          f"in {time.perf_counter() - t0:.1f} s; store {store.uri}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `genserve build` to the top-level command's subparsers."""
    p = subparsers.add_parser("build", help="export committed checkpoints to ONNX and publish them (idempotent)")
    p.add_argument("families", nargs="*", metavar="FAMILY",
                   help=f"default: all of {', '.join(BUILDS)} ({JUDGE}: the classifier, the cascade's judge)")
    p.add_argument("--store", default=None, metavar="PATH_OR_URI",
                   help="model store (default: $GENSERVE_STORE, else ./model_store_data)")
    p.add_argument("--checkpoints", type=Path, default=CHECKPOINT_ROOT, help="folder of <family>/ checkpoints")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="largest batch in the latency profile")
    p.set_defaults(func=_build_command)
