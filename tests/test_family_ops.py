"""The families' own operations — VAE interpolation and reconstruction, flow and PixelCNN likelihood — and
GET /v1/models and /openapi.json: the request layer and the maths alone, then end to end on the session's
real app (tests/conftest.py) with the trained models, checked against the torch families and against the
bits/dim `genserve evaluate` measured on the test set."""
from __future__ import annotations

import base64
import io
import json
import math
import struct
import time
import urllib.error
import urllib.request
import zlib

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

from core.contracts import NULL_CLASS
from families.checkpoint import load_model
from families.data import load_split
from genserve.anomaly import auroc, outlier_sets
from serving.api import family_ops, openapi, validation
from serving.api.errors import APIError
from serving.api.openai import _IGNORED, _KNOWN, parse_image_request
from serving.api.png import decode_png, encode_png
from serving.operations import complexity_bits_per_dim, lerp, slerp
from tests.helpers import http_json, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

FAMILIES = {"gan": "gan", "vae": "vae", "flow": "flow", "diffusion": "diffusion", "pixelcnn": "pixelcnn"}


def b64(image: np.ndarray) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")


def pillow_png(array: np.ndarray, **options) -> bytes:
    """A PNG as Pillow writes it: uint8 [H, W] -> grayscale, [H, W, 3] -> RGB, uint16 -> 16-bit."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG", **options)
    return out.getvalue()


# ---- PNG decoding ------------------------------------------------------------------------------------------

def _png_with_filter(image: np.ndarray, kind: int) -> bytes:
    """image's PNG with every row under one filter type (0 None .. 4 Paeth), written out by the spec."""
    def predict(a, b, c):
        p = a + b - c
        return [0, a, b, (a + b) // 2,
                a if abs(p - a) <= min(abs(p - b), abs(p - c)) else (b if abs(p - b) <= abs(p - c) else c)][kind]
    rows, prev = [], [0] * image.shape[1]
    for line in image.astype(int).tolist():
        rows.append(bytes([kind] + [(v - predict(line[x - 1] if x else 0, prev[x], prev[x - 1] if x else 0)) % 256
                                    for x, v in enumerate(line)]))
        prev = line

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    h, w = image.shape
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def test_png_decoder_reads_every_row_filter_and_pillows_output():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    smooth = (np.add.outer(np.arange(28), np.arange(28)) * 4).astype(np.uint8)  # Pillow picks filters for it
    for kind in range(5):
        np.testing.assert_array_equal(decode_png(_png_with_filter(image, kind)), image)
    for img in (image, smooth):
        np.testing.assert_array_equal(decode_png(encode_png(img)), img)
        np.testing.assert_array_equal(decode_png(pillow_png(img, optimize=True)), img)


def _flip(data: bytes, at: int) -> bytes:
    """data with one bit of byte `at` flipped."""
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


@pytest.mark.parametrize("data, message", [
    (b"GIF89a....", "not a PNG"),
    (pillow_png(np.zeros((28, 28, 3), np.uint8)), "must be 8-bit grayscale (bit depth 8, color type 0), got bit "
                                                  "depth 8, color type 2"),
    (pillow_png(np.zeros((28, 28), np.uint16)), "must be 8-bit grayscale"),
    (encode_png(np.zeros((28, 28), np.uint8))[:-12], "truncated or unreadable PNG"),         # no IEND
    (encode_png(np.zeros((28, 28), np.uint8))[:45], "truncated or unreadable PNG"),          # cut in IDAT
    (encode_png(np.zeros((28, 28), np.uint8))[:40] + b"\x00" + encode_png(np.zeros((28, 28), np.uint8))[41:],
     "corrupt PNG"),                                                                         # a chunk's name
    (_flip(encode_png(np.zeros((28, 28), np.uint8)), 50), "corrupt PNG (broken PNG file (bad header checksum"),
])
def test_png_decoder_refuses_what_is_not_an_8_bit_grayscale_png(data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decode_png(data)


def _png_of_size(w: int, h: int, raw: bytes) -> bytes:
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def test_png_decoder_refuses_decompression_bombs_before_decompressing():
    bomb = _png_of_size(20_000, 20_000, b"\x00" * (1 << 20))  # 400 million pixels promised: 1.2 KB sent
    with pytest.raises(ValueError, match=r"^the PNG is 20000x20000: more than 1048576 pixels$"):
        decode_png(bomb)
    with pytest.raises(ValueError, match=r"^the PNG is 20000x20000; images must be 28x28$"):
        decode_png(bomb, shape=(28, 28))
    with pytest.raises(ValueError, match=r"^the PNG is 0x0: empty$"):
        decode_png(_png_of_size(0, 0, b""))
    # the right size, but image data that inflates to 64 MB: only the 28 rows of 29 bytes are ever inflated
    start = time.perf_counter()
    image = decode_png(_png_of_size(28, 28, b"\x00" * (64 << 20)), shape=(28, 28))
    assert image.shape == (28, 28) and not image.any() and time.perf_counter() - start < 1
    # the API's guard is the exact size, checked on the header
    with pytest.raises(APIError, match=r"images\[0\]: the PNG is 20000x20000; images must be 28x28"):
        family_ops.parse_likelihood({"images": [base64.b64encode(bomb).decode()]}, FAMILIES)


# ---- requests ----------------------------------------------------------------------------------------------

def test_requests_parse_into_jobs():
    img = np.arange(784).reshape(28, 28).astype(np.uint8)
    req = family_ops.parse_likelihood({"images": [b64(img), "data:image/png;base64," + b64(img), img.tolist()],
                                       "prompt": "sneakers", "seed": 3}, FAMILIES)
    assert (req.model, req.method, req.job.class_id, req.job.seed, req.class_name) == \
           ("flow", "log_likelihood", 7, 3, "Sneaker")
    np.testing.assert_array_equal(req.job.images, np.stack([img] * 3))
    assert family_ops.parse_likelihood({"model": "pixelcnn", "images": [b64(img)]}, FAMILIES).job.class_id == NULL_CLASS
    req = family_ops.parse_interpolation({"seeds": [1, 2], "class_id": 3, "frames": 5}, FAMILIES)
    assert (req.model, req.method, req.job.seeds, req.job.frames, req.job.class_id) == \
           ("vae", "interpolate", (1, 2), 5, 3)
    req = family_ops.parse_reconstruction({"model": "auto", "images": [b64(img)]}, FAMILIES)
    assert (req.model, req.method) == ("vae", "reconstruct")


@pytest.mark.parametrize("fields, class_id", [
    ({}, NULL_CLASS), ({"prompt": ""}, NULL_CLASS), ({"prompt": "Bags"}, 8), ({"class_id": 8}, 8),
    ({"prompt": "bag", "class_id": 8}, 8),            # both, agreeing
    ({"prompt": "a lovely one", "class_id": 3}, 3),   # free text names no class: class_id decides
])
def test_the_class_rule_is_the_generations_one(fields, class_id):
    """The operations read the class as generations do (validation.class_of): one rule for every API."""
    assert family_ops.parse_reconstruction({"images": [PNG], **fields}, FAMILIES).job.class_id == class_id
    assert parse_image_request({"model": "gan", **fields}, FAMILIES).job.class_id == class_id


PNG = b64(np.zeros((28, 28), np.uint8))


@pytest.mark.parametrize("parse, body, status, param, message", [
    ("likelihood", {"model": "gan", "images": [PNG]}, 400, "model",
     "'gan' is a gan model; likelihood needs a flow or pixelcnn model (served: flow, pixelcnn)"),
    ("likelihood", {"model": "diffusion", "images": [PNG]}, 400, "model", "'diffusion' is a diffusion model"),
    ("interpolation", {"model": "flow", "seeds": [1, 2]}, 400, "model",
     "'flow' is a flow model; interpolate needs a vae"),
    ("likelihood", {"model": "nope", "images": [PNG]}, 404, "model", "the model 'nope' does not exist"),
    ("likelihood", {"images": []}, 400, "images", "images must be a list of 1 to 64 images, got 0 images"),
    ("likelihood", {"images": [PNG] * 65}, 400, "images", "images must be a list of 1 to 64 images, got 65 images"),
    ("likelihood", {}, 400, "images", "images must be a list of 1 to 64 images, got None"),
    ("likelihood", {"images": ["not base64!"]}, 400, "images[0]", "images[0] is not valid base64"),
    ("likelihood", {"images": [PNG, base64.b64encode(b"GIF89a").decode()]}, 400, "images[1]", "images[1]: not a PNG"),
    ("likelihood", {"images": [b64(np.zeros((28, 29), np.uint8))]}, 400, "images[0]",
     "images[0]: the PNG is 29x28; images must be 28x28"),
    ("likelihood", {"images": [base64.b64encode(pillow_png(np.zeros((28, 28, 3), np.uint8))).decode()]}, 400,
     "images[0]", "images[0]: the PNG must be 8-bit grayscale"),
    ("likelihood", {"images": [[[0] * 28] * 27]}, 400, "images[0]", "images[0] must be 28 rows of 28 integers"),
    ("likelihood", {"images": [[[0] * 27 + [256]] * 28]}, 400, "images[0]",
     "images[0]: every pixel must be an integer"),
    ("likelihood", {"images": [7]}, 400, "images[0]", "images[0] must be a base64 PNG string"),
    ("likelihood", {"images": [PNG], "seed": -1}, 400, "seed", "seed must be an integer in [0, 2**64 - 1]"),
    ("likelihood", {"images": [PNG], "prompt": "a dog"}, 400, "prompt", "prompt 'a dog' names no Fashion-MNIST class"),
    ("likelihood", {"images": [PNG], "prompt": "bag", "class_id": 1}, 400, "class_id",
     "class_id 1 (Trouser) contradicts the prompt, which names Bag"),
    ("likelihood", {"images": [PNG], "prompt": "bag" * 334}, 400, "prompt",
     "prompt must be at most 1000 characters, got 1002"),
    ("likelihood", {"images": [PNG], "class_id": 11}, 400, "class_id", "class_id must be an integer in [0, 10]"),
    ("likelihood", {"images": [PNG], "steps": 3}, 400, "steps", "unrecognized request argument: 'steps'"),
    ("likelihood", [PNG], 400, None, "the request body must be a JSON object, got list"),
    ("interpolation", {}, 400, "seeds", "give the two ends of the interpolation as `seeds`"),
    ("interpolation", {"seeds": [1, 2], "images": [PNG, PNG]}, 400, "images", "give the ends as `seeds` or"),
    ("interpolation", {"seeds": [1]}, 400, "seeds", "seeds must be two integers"),
    ("interpolation", {"images": [PNG]}, 400, "images", "images must be a list of exactly 2 images, got 1"),
    ("interpolation", {"seeds": [1, 2], "frames": 1}, 400, "frames", "frames must be an integer in [2, 32]"),
    ("interpolation", {"seeds": [1, 2], "frames": 33}, 400, "frames", "frames must be an integer in [2, 32]"),
    ("reconstruction", {"model": "pixelcnn", "images": [PNG]}, 400, "model", "'pixelcnn' is a pixelcnn model; "
                                                                              "reconstruct needs a vae model"),
])
def test_request_errors(parse, body, status, param, message):
    with pytest.raises(APIError) as info:
        getattr(family_ops, f"parse_{parse}")(body, FAMILIES)
    assert (info.value.status, info.value.param) == (status, param)
    assert info.value.message.startswith(message), info.value.message


def test_no_served_model_has_the_operation():
    with pytest.raises(APIError, match="no served model can likelihood: it needs a flow or pixelcnn model"):
        family_ops.parse_likelihood({"images": [PNG]}, {"gan": "gan"})


# ---- the maths ---------------------------------------------------------------------------------------------

def test_slerp_keeps_the_ends_and_a_gaussians_norm():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(8), rng.standard_normal(8)
    path = slerp(a, b, 7)
    np.testing.assert_allclose(path[[0, -1]], np.stack([a, b]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), np.linspace(np.linalg.norm(a), np.linalg.norm(b), 7),
                               rtol=1e-5)
    # the straight line's middle falls towards the origin, where N(0, I) has little mass; the great circle's not
    assert np.linalg.norm(lerp(a, b, 3)[1]) < 0.7 * np.linalg.norm(slerp(a, b, 3)[1])
    np.testing.assert_allclose(slerp(a, a, 4), np.stack([a] * 4), atol=1e-6)


def test_complexity_ranks_blank_below_real_below_noise():
    rng = np.random.default_rng(0)
    blank, noise = np.zeros((1, 28, 28), np.uint8), rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)
    real = load_split("test").images[:1]
    c = complexity_bits_per_dim(np.concatenate([blank, real, noise]))
    assert c[0] < 1 < c[1] < 8 < c[2]  # noise does not compress: 8 bits per pixel plus zlib's framing


def test_auroc_and_the_outlier_sets():
    assert auroc([1, 2], [3, 4]) == 1.0 and auroc([3, 4], [1, 2]) == 0.0 and auroc([1, 2], [1, 2]) == 0.5
    images = load_split("test").images[:8]
    sets = outlier_sets(images, np.random.default_rng(0))
    assert all(s.shape == images.shape and s.dtype == np.uint8 for s in sets.values())
    np.testing.assert_array_equal(sets["rotated 90°"][0], np.rot90(images[0]))
    assert all((s > 0).any() and (s == 0).any() for s in sets["plain shapes"])


# ---- the running app ----------------------------------------------------------------------------------------

def post(url: str, body) -> tuple[int, dict]:
    return http_json("POST", url, body)

def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def png_images(response: dict) -> np.ndarray:
    return np.stack([decode_png(base64.b64decode(d["b64_json"])) for d in response["data"]])


@pytest.fixture(scope="module")
def url(server) -> str:
    return server["url"]


@pytest.fixture(scope="module")
def test_set():
    return load_split("test")


@pytest.fixture(scope="module")
def models(url) -> dict[str, dict]:
    return {m["id"]: m for m in get(url + "/v1/models")["data"]}


def test_models_list_operations_quality_and_latency(models, served_store):
    assert {name: m["operations"] for name, m in models.items()} == {
        "gan": ["generate"], "vae": ["generate", "interpolate", "reconstruct"], "flow": ["generate", "likelihood"],
        "diffusion": ["generate"], "pixelcnn": ["generate", "likelihood"]}
    for name, m in models.items():
        manifest = served_store.manifest(name)
        assert m["metrics"]["fd"] == manifest.metrics["fd"] and "by_setting" not in m["metrics"]
        graphs = {g.graph for g in manifest.graphs}
        assert set(m["latency"]["ms_per_forward"]) == graphs and m["latency"]["provider"]
        assert all(ms > 0 for row in m["latency"]["ms_per_forward"].values() for ms in row.values())
    assert set(models["flow"]["metrics"]["bits_per_dim"]) == {"conditional", "unconditional"}
    assert set(models["vae"]["latency"]["ms_per_forward"]) == {"decode", "encode"}


def test_interpolating_between_seeds_starts_and_ends_at_their_samples(url):
    status, r = post(url + "/v1/images/interpolations", {"model": "vae", "seeds": [5, 9], "frames": 6, "prompt": "bag"})
    assert status == 200, r
    frames = png_images(r)
    assert frames.shape == (6, 28, 28) and (r["class_id"], r["class_name"], r["family"]) == (8, "Bag", "vae")
    assert r["settings"] == {"endpoints": "seeds", "path": "slerp"}
    for seed, frame in ((5, frames[0]), (9, frames[-1])):
        status, g = post(url + "/v1/images/generations", {"model": "vae", "prompt": "bag", "seed": seed, "n": 1})
        assert status == 200
        assert np.abs(png_images(g)[0].astype(int) - frame).max() <= 1  # same z and class; batch-size rounding
    assert len({f.tobytes() for f in frames}) == 6  # it moves


def test_interpolating_between_images_starts_at_their_reconstructions(url, test_set):
    a, b = test_set.images[0], test_set.images[1]
    status, r = post(url + "/v1/images/interpolations", {"images": [b64(a), b64(b)], "frames": 4})
    assert status == 200 and r["model"] == "vae" and r["settings"] == {"endpoints": "images", "path": "lerp"}
    status, rec = post(url + "/v1/images/reconstructions", {"images": [b64(a), b64(b)]})
    assert status == 200
    np.testing.assert_allclose(png_images(r)[[0, -1]], png_images(rec), atol=1)


def test_reconstruction_matches_the_torch_vae_and_flags_noise_and_rotations(url, test_set):
    images = test_set.images[:64]
    status, r = post(url + "/v1/images/reconstructions", {"images": [x.tolist() for x in images]})
    assert status == 200 and r["class_id"] == NULL_CLASS
    vae, _ = load_model("vae")
    with torch.no_grad():
        x, y = torch.from_numpy(images.copy()).unsqueeze(1), torch.full((64,), NULL_CLASS)
        mean = vae.decoder(vae.encoder(x.float() / 255, y)[0], y)
    expected = (mean[:, 0].numpy() * 255).round()
    assert np.abs(png_images(r).astype(int) - expected).max() <= 1
    mse = np.array([d["reconstruction_mse"] for d in r["data"]])
    np.testing.assert_allclose(mse, ((mean[:, 0].numpy() - images / 255) ** 2).mean((1, 2)), atol=1e-5)

    def scores(batch):
        status, r = post(url + "/v1/images/reconstructions", {"images": [b64(x) for x in batch]})
        assert status == 200
        return np.array([d["reconstruction_mse"] for d in r["data"]])
    noise = np.random.default_rng(0).integers(0, 256, (32, 28, 28), dtype=np.uint8)
    assert auroc(mse, scores(noise)) == 1.0
    assert auroc(mse, scores(np.rot90(images, 1, axes=(1, 2)))) > 0.8  # 0.91 on 512 images (README)


@pytest.mark.parametrize("family", ["flow", "pixelcnn"])
def test_likelihood_matches_the_torch_model_and_the_evaluated_test_set(url, test_set, models, family):
    """Per image: the torch family's bits_per_dim on the same input (the flow's dequantization noise
    reproduced from the seed). On average over 128 test images: `genserve evaluate`'s 10,000-image figure,
    within 4 standard errors; the same per class with the true class as condition."""
    images = test_set.images[:128]
    bits = []
    for start in range(0, len(images), 64):
        status, r = post(url + "/v1/likelihood", {"model": family, "images": [b64(x) for x in images[start:start + 64]],
                                                 "seed": start})
        assert status == 200, r
        assert (r["family"], r["class_id"], r.get("seed")) == (family, NULL_CLASS, start if family == "flow" else None)
        bits += [d["bits_per_dim"] for d in r["data"]]
    bits = np.array(bits)

    model, _ = load_model(family)
    x, y = torch.from_numpy(images[:64].copy()).unsqueeze(1), torch.full((64,), NULL_CLASS)
    with torch.no_grad():
        if family == "flow":
            u = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)  # the server's noise for seed 0
            expected = model.bits_per_dim((x.float() + torch.from_numpy(u)) / 256, y)
        else:
            expected = model.bits_per_dim(x, y)
    np.testing.assert_allclose(bits[:64], expected.numpy(), atol=2e-3)

    evaluated = models[family]["metrics"]["bits_per_dim"]
    assert abs(bits.mean() - evaluated["unconditional"]) < 4 * bits.std() / math.sqrt(len(bits))
    conditional = []
    for c in range(10):
        of_class = test_set.images[test_set.labels == c][:12]
        status, r = post(url + "/v1/likelihood", {"model": family, "class_id": c, "images": [b64(x) for x in of_class]})
        assert status == 200 and r["class_name"] is not None
        conditional += [d["bits_per_dim"] for d in r["data"]]
    conditional = np.array(conditional)
    assert abs(conditional.mean() - evaluated["conditional"]) < 4 * conditional.std() / math.sqrt(len(conditional))


@pytest.mark.parametrize("family", ["flow", "pixelcnn"])
def test_likelihood_anomaly_score_separates_test_images_from_noise_and_simple_ones(url, test_set, family):
    def score(images):
        status, r = post(url + "/v1/likelihood", {"model": family, "images": [b64(x) for x in images]})
        assert status == 200
        return np.array([d["bits_per_dim"] for d in r["data"]]), np.array([d["anomaly_score"] for d in r["data"]])
    rng = np.random.default_rng(1)
    test_bits, test_score = score(test_set.images[256:320])
    noise_bits, noise_score = score(rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    simple = np.zeros((4, 28, 28), np.uint8)  # black, as Fashion-MNIST's background, with a plain shape or none
    simple[1, 8:20, 8:20], simple[2, 14, 4:24], simple[3, 10:18, 10:18] = 200, 255, 255
    simple_bits, simple_score = score(simple)
    assert noise_bits.min() > test_bits.max() and auroc(test_score, noise_score) == 1.0
    # bits/dim alone calls such an image more "normal" than most real ones; the complexity correction does not
    assert simple_bits.max() < np.median(test_bits)
    assert auroc(test_score, simple_score) > 0.9


def test_operations_errors_over_http(url):
    cases = [("/v1/likelihood", {"model": "gan", "images": [PNG]}, 400, "unsupported_operation"),
             ("/v1/likelihood", {"images": [b64(np.zeros((27, 28), np.uint8))]}, 400, "invalid_value"),
             ("/v1/images/reconstructions", {"images": [PNG] * 65}, 400, "invalid_value"),
             ("/v1/images/interpolations", {"model": "ghost", "seeds": [1, 2]}, 404, "model_not_found"),
             ("/v1/images/interpolations", b"{not json", 400, "invalid_json")]
    for path, body, status, code in cases:
        got, r = post(url + path, body)
        assert (got, r["error"]["code"]) == (status, code), r
        assert set(r["error"]) == {"message", "type", "param", "code"}
    assert post(url + "/v1/likelihood", {"images": [PNG]})[0] == 200  # and it keeps serving


def test_deployments_refuse_operations_their_family_lacks(server):
    """The KServe v2 path calls the deployments directly: they check too, with a ValueError (HTTP 400)."""
    from ray import serve

    from serving.api.jobs import ImagesJob, InterpolationJob
    job = ImagesJob(np.zeros((1, 28, 28), np.uint8), NULL_CLASS)
    for model, method, arg in (("gan", "log_likelihood", job), ("diffusion", "log_likelihood", job),
                               ("flow", "reconstruct", job), ("flow", "interpolate", InterpolationJob(0, 2, (1, 2)))):
        handle = serve.get_deployment_handle(model, app_name="genserve")
        with pytest.raises(Exception) as info:
            getattr(handle, method).remote(arg).result(timeout_s=60)
        cause = getattr(info.value, "cause", None) or info.value
        assert isinstance(cause, ValueError) and f"{model} is a" in str(cause), info.value


# ---- the OpenAPI document -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spec(url) -> dict:
    return get(url + "/openapi.json")


def _validator(spec: dict, schema: dict) -> jsonschema.Draft202012Validator:
    """A validator for one schema of the document, its $refs resolved against the document's components."""
    return jsonschema.Draft202012Validator({**schema, "components": spec["components"]})


def test_the_document_lists_exactly_the_routes_the_app_answers(spec):
    from fastapi.routing import iter_route_contexts

    from serving.api.ingress import api
    assert spec == json.loads(json.dumps(api.openapi()))  # the served document is this app's
    routes = {(route.path, method.lower()) for route in iter_route_contexts(api.routes)  # included routers too
              if route.path != api.openapi_url for method in route.methods}
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert routes == documented
    assert "/openapi.json" not in spec["paths"] and {"/", "/v1/likelihood", "/v1/images/interpolations"} <= {
        p for p, _ in documented}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (path, method)  # validation errors are answered as 400


def test_the_generation_schema_takes_what_the_parser_takes(spec):
    properties = set(spec["components"]["schemas"]["ImageGenerationRequest"]["properties"])
    assert properties == _KNOWN and _IGNORED <= properties


def test_every_example_request_is_served_as_documented(spec, url):
    checked = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if "requestBody" not in op:
                continue
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]
            for example in schema.get("examples", []):
                _validator(spec, schema).validate(example)
                status, response = post(url + path, example)
                assert status == 200, (path, response)
                _validator(spec, op["responses"]["200"]["content"]["application/json"]["schema"]).validate(response)
                checked += 1
    assert checked >= 4  # generations, interpolations, reconstructions, likelihood
    status, error = post(url + "/v1/likelihood", {"images": []})
    assert status == 400
    _validator(spec, {"$ref": "#/components/schemas/ErrorResponse"}).validate(error)
    for path, route in (("/v1/models", "/v1/models"), ("/v1/models/flow", "/v1/models/{model_id}")):
        schema = spec["paths"][route]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        _validator(spec, schema).validate(get(url + path))


def test_the_request_schemas_refuse_what_the_parsers_refuse(spec):
    """The schema and the parser agree on the edges: a body one refuses, the other refuses too."""
    schemas = spec["components"]["schemas"]
    cases = [("LikelihoodRequest", "likelihood", {"images": [PNG] * 65}),
             ("LikelihoodRequest", "likelihood", {"images": [PNG], "steps": 3}),
             ("LikelihoodRequest", "likelihood", {"images": [[[0] * 28] * 27]}),
             ("LikelihoodRequest", "likelihood", {"images": [PNG], "class_id": 11}),
             ("InterpolationRequest", "interpolation", {"seeds": [1, 2], "frames": 33}),
             ("InterpolationRequest", "interpolation", {"seeds": [1, 2, 3]}),
             ("ReconstructionRequest", "reconstruction", {"images": []})]
    for name, parse, body in cases:
        assert not _validator(spec, schemas[name]).is_valid(body), body
        with pytest.raises(APIError):
            getattr(family_ops, f"parse_{parse}")(body, FAMILIES)
    assert openapi.ErrorResponse.model_json_schema()["required"] == ["error"]


def test_the_schemas_bounds_are_the_parsers_limits():
    """The document's bounds are validation's constants, so a changed limit changes both."""
    def prop(model, name):
        schema = model.model_json_schema()["properties"][name]
        return next((s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"), schema)
    gen = openapi.ImageGenerationRequest
    assert (prop(gen, "n")["maximum"], prop(gen, "steps")["maximum"], prop(gen, "seed")["maximum"]) == \
           (validation.MAX_N, validation.MAX_STEPS, validation.MAX_SEED)
    assert prop(gen, "prompt")["maxLength"] == validation.MAX_PROMPT_CHARS
    assert prop(gen, "class_id")["maximum"] == validation.MAX_CLASS_ID == NULL_CLASS
    assert tuple(prop(gen, "sampler")["enum"]) == validation.SAMPLERS
    assert tuple(prop(gen, "goal")["enum"]) == validation.GOALS
    assert set(prop(gen, "quality")["enum"]) == set(validation.TIERS) | set(validation.OPENAI_QUALITY)
    frames = prop(openapi.InterpolationRequest, "frames")
    assert (frames["minimum"], frames["maximum"], frames["default"]) == \
           (validation.MIN_FRAMES, validation.MAX_FRAMES, validation.DEFAULT_FRAMES)
    assert prop(openapi.LikelihoodRequest, "images")["maxItems"] == validation.MAX_IMAGES
    # and the parsers hold to the same numbers
    with pytest.raises(APIError, match=f"n must be an integer in \\[1, {validation.MAX_N}\\]"):
        parse_image_request({"n": validation.MAX_N + 1}, FAMILIES)
    with pytest.raises(APIError, match=f"frames must be an integer in \\[2, {validation.MAX_FRAMES}\\]"):
        family_ops.parse_interpolation({"seeds": [1, 2], "frames": validation.MAX_FRAMES + 1}, FAMILIES)


def test_genserve_anomaly_prints_the_separation_table(url, capsys):
    run_cli("anomaly", "--url", url, "--images", "16")
    lines = capsys.readouterr().out.strip().splitlines()
    table = [line.split("|")[1:-1] for line in lines if line.startswith("| ")][1:]   # header left out
    assert [(row[0].strip(), row[1].strip()) for row in table] == [
        ("flow", "bits_per_dim"), ("flow", "anomaly_score"), ("pixelcnn", "bits_per_dim"),
        ("pixelcnn", "anomaly_score"), ("vae", "reconstruction_mse")]
    assert all(float(row[3]) == 1.0 for row in table)  # uniform noise: every score separates it
