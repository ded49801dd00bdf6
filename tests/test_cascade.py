"""The quality cascade (serving/api/cascade.py): the judge's graph (the committed classifier, exported with a
parity check), then cascades through the real app (tests/conftest.py's server, whose store has the judge)
with the real `openai` and `tritonclient` clients: which stage served each image, and why."""
from __future__ import annotations

import json
import time

import numpy as np
import openai
import pytest
import torch

from core.contracts import NULL_CLASS
from exporters.onnx_export import PARITY_ATOL, export_family
from families.checkpoint import CHECKPOINT_ROOT, load_model
from genserve.build import JUDGE
from serving.judge import confidence
from tests.helpers import metric_samples
from tests.test_openai_api import images_of

CLASSIFIER = CHECKPOINT_ROOT / "classifier"
SLO_MS = 20_000     # ample: every stage fits, on a busy 2-core machine too


# ---- the judge --------------------------------------------------------------------------------------------

def test_the_judge_graph_matches_the_classifier(tmp_path):
    """classifier.classify exports with parity, and its softmax is training's on uint8 / 255 images."""
    model, card = load_model("classifier", CLASSIFIER)
    [graph] = export_family("classifier", model, card["config"], tmp_path, threads=1)
    assert graph.contract.graph == "classify" and max(graph.parity.values()) <= PARITY_ATOL
    import onnxruntime as ort

    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    session = ort.InferenceSession(str(graph.path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": images[:, None].astype(np.float32) / 255})[0]
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(images[:, None])), -1).numpy()
    classes = np.array([0, 3, 9, NULL_CLASS, 5])
    got = confidence(logits, classes)
    np.testing.assert_allclose(got[[0, 1, 2, 4]], want[[0, 1, 2, 4], classes[[0, 1, 2, 4]]], atol=1e-5)
    assert got[3] == pytest.approx(want[3].max(), abs=1e-5)   # no class asked: its most likely class


def test_the_judge_is_published_with_parity(served_store):
    manifest = served_store.manifest(f"{JUDGE}@latest")
    assert manifest.family == "classifier" and [g.graph for g in manifest.graphs] == ["classify"]
    assert max(manifest.export.parity["classify"].values()) <= PARITY_ATOL


# ---- cascades through the app ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def cascade(client, prompt: str = "a sneaker", **extra):
    return client.images.generate(model="auto", prompt=prompt,
                                  extra_body={"cascade": True, "latency_slo_ms": SLO_MS, **extra})


def test_each_image_says_which_stage_served_it_and_why(client):
    response = cascade(client, n=4, seed=11, cascade_threshold=0.9)
    account = response.policy["cascade"]
    assert account["threshold"] == 0.9 and account["stage1"] == "gan" and account["judge_ms"] > 0
    assert account["planned_stage2"].startswith("diffusion ")
    assert len(account["images"]) == 4 and len(images_of(response)) == 4
    for image in account["images"]:
        escalated = image["score"] < 0.9
        assert image["outcome"] == ("escalated" if escalated else "passed")
        assert (image["stage"], image["model"]) == ((2, "diffusion") if escalated else (1, "gan"))
    assert account["escalated"] == sum(i["stage"] == 2 for i in account["images"])
    if account["escalated"]:
        assert account["stage2"]["model"] == "diffusion" and account["stage2"]["actual_ms"] > 0
    assert response.policy["slo_met"] and response.policy["actual_ms"] <= SLO_MS


def test_threshold_zero_keeps_stage_one(client):
    """Nothing escalates, and the image is the GAN's own for that seed."""
    response = cascade(client, seed=5, cascade_threshold=0.0)
    account = response.policy["cascade"]
    assert account["escalated"] == 0 and account["stage2"] is None
    assert [i["outcome"] for i in account["images"]] == ["passed"]
    assert response.model == "gan"
    gan = client.images.generate(model="gan", prompt="a sneaker", extra_body={"seed": 5})
    np.testing.assert_array_equal(images_of(response), images_of(gan))


def test_prometheus_counts_cascade_images_by_outcome(client, server):
    """genserve_cascade_images_total{outcome}: one per image delivered (Ray exports every second)."""
    def counts() -> dict[str, float]:
        return {labels["outcome"]: value for labels, value in
                metric_samples(server["metrics_port"], "ray_genserve_cascade_images_total")}

    before = counts()
    while time.sleep(1.5) or (now := counts()) != before:  # earlier requests' counts still arriving
        before = now
    cascade(client, n=3, seed=8, cascade_threshold=0.0)
    deadline = time.monotonic() + 20
    while counts().get("passed", 0) - before.get("passed", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert counts().get("passed", 0) - before.get("passed", 0) == 3


def test_threshold_one_escalates_every_image_to_diffusion(client):
    """Every image escalates; each is diffusion's 1-image image for its seed (seed + i) at stage 2's setting."""
    response = cascade(client, "a pullover", n=2, seed=21, cascade_threshold=1.0)
    account = response.policy["cascade"]
    assert account["escalated"] == 2 and {i["stage"] for i in account["images"]} == {2}
    assert response.model == "diffusion"
    settings = account["stage2"]["settings"]
    for i, image in enumerate(images_of(response)):
        alone = client.images.generate(model="diffusion", prompt="a pullover",
                                       extra_body={"seed": 21 + i, **settings})
        np.testing.assert_array_equal(image, images_of(alone)[0])


def test_an_slo_too_tight_for_stage_two_is_served_without_a_cascade(client):
    """Stage 2 for every image cannot fit: the request is served as without a cascade (a one-pass model
    fits), and every image's account says why."""
    response = cascade(client, n=2, seed=3, cascade_threshold=1.0, latency_slo_ms=60)
    account = response.policy["cascade"]
    assert response.model == account["stage1"] == response.policy["model"] and response.family in ("gan", "vae")
    assert account["escalated"] == 0 and account["stage2"] is None
    assert [i["outcome"] for i in account["images"]] == ["not_planned"] * 2
    assert "would not meet the SLO" in account["reason"]


@pytest.mark.parametrize("extra, param, message", [
    ({"cascade": "yes"}, "cascade", "cascade must be true or false"),
    ({"cascade": True, "cascade_threshold": 1.5}, "cascade_threshold", "in [0, 1]"),
    ({"cascade": True, "cascade_threshold": "high"}, "cascade_threshold", "in [0, 1]"),
    ({"cascade_threshold": 0.5}, "cascade_threshold", "only with cascade: true"),
    ({"cascade": True, "model": "gan"}, "cascade", "ask for model 'auto'"),
    ({"cascade": True, "goal": "latent"}, "cascade", "goal 'sample'"),
])
def test_bad_cascade_parameters_are_400s_in_openai_shape(client, extra, param, message):
    extra = dict(extra)
    model = extra.pop("model", "auto")
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.images.generate(model=model, prompt="a bag", extra_body=extra)
    error = exc_info.value.response.json()["error"]
    assert exc_info.value.status_code == 400 and error["param"] == param and message in error["message"]


def test_kserve_v2_cascade_parameter(server):
    """The v2 parameter `cascade`, and a `cascade` response parameter with each image's stage."""
    import tritonclient.http as triton

    url = server["url"].removeprefix("http://")
    with triton.InferenceServerClient(url) as tc:
        class_id = triton.InferInput("class_id", [3], "INT64")
        class_id.set_data_from_numpy(np.array([1, 4, 8], np.int64))
        seed = triton.InferInput("seed", [3], "INT64")
        seed.set_data_from_numpy(np.array([100, 101, 102], np.int64))
        result = tc.infer("auto", [class_id, seed], parameters={"cascade": True, "cascade_threshold": 0.0,
                                                                  "latency_slo_ms": SLO_MS})
    account = json.loads(result.get_response()["parameters"]["cascade"])
    assert [i["stage"] for i in account["images"]] == [1, 1, 1] and account["threshold"] == 0.0
    assert result.as_numpy("image").shape == (3, 28, 28)
