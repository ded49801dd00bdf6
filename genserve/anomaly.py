"""`genserve anomaly`: how well the served models' scores tell Fashion-MNIST test images from images that are
not Fashion-MNIST (noise, rotated, upside down, inverted, plain shapes), as the AUROC of each score: the
chance that an outlier scores higher than a test image (1.0 separates them perfectly, 0.5 is a coin toss,
below 0.5 the score ranks outliers as *more* normal). Speaks only the public HTTP API of a running server
(`genserve up`): POST /v1/likelihood (flow, pixelcnn) and /v1/images/reconstructions (vae)."""
from __future__ import annotations

import argparse
import base64
import json
import urllib.error
import urllib.request

import numpy as np

from serving.api.png import encode_png

# (model, route, response field) of each score; every one is "higher = more unusual"
SCORES = (("flow", "/v1/likelihood", "bits_per_dim"), ("flow", "/v1/likelihood", "anomaly_score"),
          ("pixelcnn", "/v1/likelihood", "bits_per_dim"), ("pixelcnn", "/v1/likelihood", "anomaly_score"),
          ("vae", "/v1/images/reconstructions", "reconstruction_mse"))
BATCH = 64  # images per request: the API's cap


def outlier_sets(images: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Images that are not Fashion-MNIST, as many as `images` (uint8 [n, 28, 28]) of each kind."""
    n = len(images)
    shapes = np.zeros_like(images)  # one filled rectangle of random size, place and brightness on black
    for image in shapes:
        top, left = rng.integers(0, 20, 2)
        height, width = rng.integers(4, 28 - max(top, left) + 1, 2)
        image[top:top + height, left:left + width] = rng.integers(64, 256)
    return {"uniform noise": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            "rotated 90°": np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2))),
            "upside down": np.ascontiguousarray(images[:, ::-1]),
            "inverted": 255 - images,
            "plain shapes": shapes}


def auroc(normal: np.ndarray, unusual: np.ndarray) -> float:
    """P(an unusual image's score > a normal one's), ties counted half: the area under the ROC curve."""
    diff = np.asarray(unusual, np.float64)[:, None] - np.asarray(normal, np.float64)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def score(url: str, model: str, route: str, field: str, images: np.ndarray) -> np.ndarray:
    """The field of each image's answer, in requests of BATCH images (PNGs, unconditional)."""
    out = []
    for start in range(0, len(images), BATCH):
        body = {"model": model, "images": [base64.b64encode(encode_png(x)).decode("ascii")
                                           for x in images[start:start + BATCH]]}
        request = urllib.request.Request(url.rstrip("/") + route, data=json.dumps(body).encode(), method="POST",
                                         headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                out += [d[field] for d in json.loads(response.read())["data"]]
        except urllib.error.HTTPError as err:
            message = err.read().decode(errors="replace")
            raise RuntimeError(f"{route} ({model}) answered {err.code}: {message}") from None
        except urllib.error.URLError as err:
            raise RuntimeError(f"no genserve server at {url} ({err.reason}); start one with `genserve up`") from None
    return np.array(out)


def separation_table(url: str, num_images: int, seed: int = 0) -> str:
    """The markdown table: one row per score, its mean on the test images and its AUROC against each set."""
    from families.data import load_split

    test = load_split("test").images[:num_images]
    sets = outlier_sets(test, np.random.default_rng(seed))
    rows = ["| model | score | mean on test | " + " | ".join(sets) + " |", "|---|---|---:|" + "---:|" * len(sets)]
    for model, route, field in SCORES:
        normal = score(url, model, route, field, test)
        cells = [f"{auroc(normal, score(url, model, route, field, images)):.3f}" for images in sets.values()]
        rows.append(f"| {model} | {field} | {normal.mean():.4g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_anomaly(args: argparse.Namespace) -> None:
    print(f"AUROC, {args.images} Fashion-MNIST test images against {args.images} of each kind "
          f"(served at {args.url}, unconditional models):\n")
    print(separation_table(args.url, args.images, args.seed))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `genserve anomaly` to the top-level command's subparsers."""
    p = subparsers.add_parser("anomaly", help="AUROC of the served anomaly scores: test images vs outliers")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (default: %(default)s)")
    p.add_argument("--images", type=int, default=512, help="test images, and outliers of each kind")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise and shapes")
    p.set_defaults(func=run_anomaly)
