"""Shared test helpers, and the constants of the served test app (tests/conftest.py)."""
from __future__ import annotations

import random
import json
import socket
import time
import urllib.error
import urllib.request
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
METRICS_EXPORT_MS = 1000  # the test app's metrics_report_interval_ms: Ray's floor, its default is 10 s


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: Ray's workers take ephemeral ports as they start,
    and took one picked there before the server bound it (a gRPC proxy failed to bind, once)."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(10_000, first_ephemeral), 100):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [10000, {first_ephemeral})")


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


def http_json(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
              timeout: float = 120) -> tuple[int, dict]:
    """A raw request (for what the real clients cannot send): status and decoded JSON body; a dict body is
    sent as JSON. Asserts no error answer carries a traceback."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers=headers if headers is not None else {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        assert b"Traceback" not in text
        return err.code, json.loads(text)


def timed_post(url: str, body: dict, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, float]:
    """http_json's POST of a JSON body (extra headers allowed), and the seconds it took to answer."""
    start = time.monotonic()
    status, answer = http_json("POST", url, body, {"content-type": "application/json", **(headers or {})}, timeout)
    return status, answer, time.monotonic() - start


def replica_metrics(model: str, app: str = APP) -> dict:
    """A model deployment's counters and gauges (its `metrics()`: the engine's or the batcher's), as a dict."""
    from ray import serve

    return vars(serve.get_deployment_handle(model, app_name=app).metrics.remote().result(timeout_s=30))


def metric_samples(metrics_port: int, series: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of one genserve series (e.g. "ray_genserve_model_ready") on this node's
    Ray metrics endpoint, read with the load generator's parser."""
    from loadtests.metrics import parse_samples

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return [(labels, value) for name, labels, value in parse_samples(text) if name == series]


def replica_names(app: str, model: str) -> list[str]:
    """The Ray actor names of a deployment's live replicas (namespace "serve"), sorted."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#{model}#"))

