"""The training loop: every family learns, runs are deterministic for a seed, and resume is exact."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from families.checkpoint import config_to_dict, load_model
from families.registry import FAMILIES, TRAINABLE, get_family
from families.train import train
from tests.test_families import TINY

torch.set_num_threads(1)


def _fixed_batch(n=16):
    from families.data import load_split

    data = load_split("train")
    return torch.from_numpy(data.images[:n].copy()).unsqueeze(1), torch.from_numpy(data.labels[:n].copy())


# The loss that must fall for each family; the GAN's is its discriminator's (the generator's is a game).
LOSS_KEY = {"vae": "bpd", "gan": "d", "flow": "bpd", "pixelcnn": "bpd", "diffusion": "loss", "classifier": "loss"}


@pytest.mark.parametrize("family", TRAINABLE)
def test_a_few_steps_lower_the_loss(family):
    spec = get_family(family)
    torch.manual_seed(0)
    tiny = TINY[family] if family in TINY else spec.Config(width=8, features=32)
    config = dataclasses.replace(tiny, lr=3e-3)
    model = spec.build(config)
    trainer = spec.make_trainer(model, config)
    x, y = _fixed_batch()
    losses = [trainer.step(x, y)[LOSS_KEY[family]] for _ in range(30)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"{family}: loss {first:.4f} -> {last:.4f}"


def _tiny_overrides(family):
    return {k: v for k, v in config_to_dict(TINY[family]).items() if k != "steps"}


def test_training_is_deterministic_for_a_seed_and_resume_is_exact(tmp_path):
    kw = dict(overrides={**_tiny_overrides("vae"), "batch_size": 8}, progress=False, save_every=3)
    train("vae", steps=6, seed=1, out_dir=tmp_path / "a", run_dir=tmp_path / "run_a", **kw)
    train("vae", steps=6, seed=1, out_dir=tmp_path / "b", run_dir=tmp_path / "run_b", **kw)
    train("vae", steps=3, seed=1, out_dir=tmp_path / "c", run_dir=tmp_path / "run_c", **kw)
    card = train("vae", steps=6, seed=1, out_dir=tmp_path / "c", run_dir=tmp_path / "run_c", **kw)  # resumes at 3
    train("vae", steps=6, seed=2, out_dir=tmp_path / "d", run_dir=tmp_path / "run_d", **kw)
    weights = {k: load_file(str(tmp_path / k / "model.safetensors")) for k in "abcd"}
    for name, tensor in weights["a"].items():
        assert torch.equal(tensor, weights["b"][name]), f"same seed differs at {name}"
        assert torch.equal(tensor, weights["c"][name]), f"resumed run differs at {name}"
    assert any(not torch.equal(t, weights["d"][k]) for k, t in weights["a"].items()), "seed has no effect"
    assert card["training_steps"] == 6 and len(card["data_sha256"]) == 64
    assert json.loads((tmp_path / "run_c" / "state.json").read_text())["step"] == 6
    with pytest.raises(ValueError, match="already at step 6"):   # never ship weights from a later step
        train("vae", steps=4, seed=1, out_dir=tmp_path / "c", run_dir=tmp_path / "run_c", **kw)


def test_gan_resume_restores_both_networks_and_optimizers(tmp_path):
    kw = dict(overrides={**_tiny_overrides("gan"), "batch_size": 8}, progress=False, save_every=2)
    train("gan", steps=4, seed=0, out_dir=tmp_path / "a", run_dir=tmp_path / "ra", **kw)
    train("gan", steps=2, seed=0, out_dir=tmp_path / "b", run_dir=tmp_path / "rb", **kw)
    train("gan", steps=4, seed=0, out_dir=tmp_path / "b", run_dir=tmp_path / "rb", **kw)
    a, b = (load_file(str(tmp_path / k / "model.safetensors")) for k in "ab")
    assert all(torch.equal(t, b[k]) for k, t in a.items())


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_weights_reload_into_an_equal_module(family, tmp_path):
    overrides = {**_tiny_overrides(family), "batch_size": 4}
    train(family, steps=1, out_dir=tmp_path, run_dir=tmp_path / "run", overrides=overrides, progress=False)
    model, card = load_model(family, tmp_path)
    assert card["family"] == family and card["parameters"] == sum(p.numel() for p in model.parameters())
    assert not model.training
