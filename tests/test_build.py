"""`genserve build`: checkpoints -> store versions, idempotent, skipping missing families; what lands in
the store runs and agrees with the torch checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.contracts import sample_inputs
from core.runtime import make_session
from core.settings import SamplingSetting
from families.checkpoint import config_to_dict, load_model, save_model
from families.registry import get_family
from genserve.build import build, sampling_settings, version_for, checkpoint_source
from model_store import ModelStore
from tests.helpers import run_cli

torch.set_num_threads(1)

SMALL = {"gan": dict(g_width=16, z_dim=32), "vae": dict(width=8, latent_dim=4)}


def write_checkpoint(root: Path, family: str, metrics: dict | None = None) -> Path:
    spec = get_family(family)
    config = spec.Config(**SMALL[family])
    torch.manual_seed(0)
    model = spec.build(config).eval()
    card = {"family": family, "config": config_to_dict(config), "training_steps": 1,
            "metrics": metrics if metrics is not None else {"fd": 42.0, "class_accuracy": 0.5}}
    save_model(root / family, model, card)
    return root / family


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "checkpoints"
    for family in SMALL:
        write_checkpoint(root, family)
    return root, ModelStore.open(tmp_path / "store")


def quiet(_: str) -> None:
    pass


def test_build_publishes_then_is_idempotent(setup):
    root, store = setup
    first = build(store, root, ("gan", "vae", "flow"), max_batch=4, log=quiet)
    assert [(r.model, r.status) for r in first] == [("gan", "published"), ("vae", "published"), ("flow", "skipped")]
    assert "no checkpoint at" in first[2].detail and "genserve train flow" in first[2].detail
    snapshot = sorted(p.relative_to(store.uri).as_posix() for p in Path(store.uri).rglob("*"))

    second = build(store, root, ("gan", "vae", "flow"), max_batch=4, log=quiet)
    assert [r.status for r in second] == ["current", "current", "skipped"]
    assert [r.version for r in second] == [r.version for r in first]
    assert sorted(p.relative_to(store.uri).as_posix() for p in Path(store.uri).rglob("*")) == snapshot
    for r in first[:2]:
        assert store.resolve(r.model) == (r.model, r.version)


def test_manifest_carries_contracts_metrics_sampling_and_latency(setup):
    root, store = setup
    build(store, root, ("vae",), max_batch=4, log=quiet)
    m = store.load("vae").manifest
    assert m.family == "vae" and [g.graph for g in m.graphs] == ["decode", "encode"]
    assert m.graphs[0].inputs[0].shape == ("batch", 4)                      # latent size from the card
    assert m.metrics == {"fd": 42.0, "class_accuracy": 0.5}                 # copied as-is
    assert m.sampling.default == SamplingSetting() and m.sampling.allowed == [SamplingSetting()]
    assert set(m.latency.ms_per_forward) == {"decode", "encode"}
    assert list(m.latency.ms_per_forward["decode"]) == [1, 2, 4]
    assert m.latency.provider == "CPUExecutionProvider" and m.latency.machine["cpu_count"] >= 1
    assert m.source.weights_sha256 and m.version == version_for(checkpoint_source(root / "vae"))
    assert all(max(p.values()) <= 1e-4 for p in m.export.parity.values())
    assert set(m.files) == {"decode.onnx", "encode.onnx"}


def test_what_is_served_matches_the_checkpoint(setup):
    root, store = setup
    build(store, root, ("gan",), max_batch=2, log=quiet)
    loaded = store.load("gan@latest")
    contract = loaded.manifest.graph("generate")
    session = make_session(loaded.graph_bytes("generate"), threads=1)
    feeds = sample_inputs(contract, 5, np.random.default_rng(1))
    module, _ = load_model("gan", root / "gan")
    with torch.no_grad():
        want = module(torch.from_numpy(feeds["z"]), torch.from_numpy(feeds["y"])).numpy()
    np.testing.assert_allclose(session.run(["x"], feeds)[0], want, atol=1e-4)


def test_new_card_metrics_make_a_new_version_and_move_latest(setup):
    root, store = setup
    old = build(store, root, ("gan",), max_batch=2, log=quiet)[0].version
    card = json.loads((root / "gan" / "card.json").read_text())
    card["metrics"]["fd"] = 40.0
    (root / "gan" / "card.json").write_text(json.dumps(card))
    new = build(store, root, ("gan",), max_batch=2, log=quiet)[0]
    assert new.status == "published" and new.version != old
    assert store.resolve("gan") == ("gan", new.version) and set(store.versions("gan")) == {old, new.version}
    store.set_alias("gan", "latest", old)                                  # someone moved it back by hand
    again = build(store, root, ("gan",), max_batch=2, log=quiet)[0]
    assert again.status == "current" and "moved latest" in again.detail
    assert store.resolve("gan") == ("gan", new.version)


def test_sampling_settings_per_family():
    diffusion = sampling_settings("diffusion")
    assert diffusion.default == SamplingSetting("dpmpp_2m", 10, 2.0)
    assert diffusion.default in diffusion.allowed
    assert {(s.sampler, s.steps) for s in diffusion.allowed} == \
           {("dpmpp_2m", 10), ("dpmpp_2m", 15), ("dpmpp_2m", 20), ("dpmpp_2m", 25), ("ddim", 25), ("ddim", 50)}
    assert sampling_settings("flow").default == SamplingSetting(temperature=0.7)
    assert sampling_settings("pixelcnn").default == SamplingSetting(guidance_scale=2.0, temperature=1.0)
    assert sampling_settings("gan").default == SamplingSetting() == sampling_settings("vae").default


def test_build_and_publish_commands(setup, capsys):
    root, store = setup
    run_cli("build", "gan", "--checkpoints", str(root), "--store", store.uri, "--max-batch", "2")
    out = capsys.readouterr().out
    assert "gan: published" in out and "build: 1 published, 0 current, 0 skipped" in out
    run_cli("store", "publish", str(root / "vae"), "--model", "vae-small", "--version", "r1", "--alias", "stable",
            "--max-batch", "2", "--store", store.uri)
    assert store.resolve("vae-small@stable") == ("vae-small", "r1") and store.aliases("vae-small") == {"stable": "r1"}
    with pytest.raises(ValueError, match="unknown families"):
        run_cli("build", "gann", "--store", store.uri)
