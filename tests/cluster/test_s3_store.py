"""The model store on object storage, for every node: an S3-compatible server (moto's server mode, a real
process) in its own network namespace, the store built into it with `genserve build --store s3://…`, and a
second application on the cluster whose replicas — one on each worker — load `gan@latest` from it by URI,
every hash verified, the verified blobs cached on the node. Then an object is tampered with: replicas that
load again refuse it with the store's clear error, and the cluster keeps serving everything else."""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import pytest
import s3fs

from tests.cluster import harness as h

pytestmark = pytest.mark.cluster

BUCKET = "genserve-cluster"
STORE = f"s3://{BUCKET}/store"
APP, PREFIX = "s3", "/s3"
BODY = {"model": "gan", "prompt": "bag", "n": 2, "seed": 11}
CACHE = Path.home() / ".cache" / "genserve" / "blobs"   # every node's default (the namespaces share this disk)


@pytest.fixture(scope="module")
def s3_server():
    sys.path.insert(0, str(h.REPO))
    from tests.s3server import start_moto_server, stop_moto_server

    h.add_host(h.S3)
    proc = None
    try:
        proc, endpoint = start_moto_server(h.S3.ip, h.S3_PORT, netns=h.S3.ns)
        h.sh(str(h.VENV_BIN / "python"), "-c", f"import s3fs; s3fs.S3FileSystem().mkdir('{BUCKET}')", env=h.env())
        yield endpoint
    finally:
        if proc is not None:
            stop_moto_server(proc)
        h.kill_namespace(h.S3.ns)
        h.sh("ip", "netns", "del", h.S3.ns, check=False)


def s3_app(base: dict) -> dict:
    """genserve's application once more, under /s3, serving gan from the S3 store: one replica per worker."""
    app = copy.deepcopy(next(a for a in base["applications"] if a["name"] == h.APP))
    app.update(name=APP, route_prefix=PREFIX)
    app["args"].update(store=STORE, models=["gan@latest"])
    app["deployments"] = [d for d in app["deployments"] if d["name"] in (h.INGRESS, "gan")]
    return app


def answers(prefix: str, body: dict, tries: int = 12) -> list[h.Response]:
    """Generations through both workers' proxies, alternately, under the application's route prefix."""
    return [h.generate(f"{w.url}{prefix}", body, timeout=60) for _ in range(tries // 2) for w in h.WORKERS]


def test_replicas_load_from_s3_verified_and_cached_and_refuse_a_tampered_object(cluster, s3_server, results):
    t0 = time.monotonic()
    h.sh(str(h.VENV_BIN / "genserve"), "build", "gan", "--store", STORE, env=h.env(), timeout=300)
    built_s = time.monotonic() - t0
    config = cluster.config()
    config["applications"].append(s3_app(config))
    try:
        cluster.deploy(config)
        h.wait_for("the s3 application RUNNING", lambda: cluster.ray.serve_details()["applications"]
                   .get(APP, {}).get("status") == "RUNNING", 300)
        served = answers(PREFIX, BODY)
        assert all(r.status == 200 for r in served), [r.body for r in served if r.status != 200]
        assert {h.served_by(r) for r in served} == {w.ip for w in h.WORKERS}      # replicas on both workers
        assert len({r.body["data"][0]["b64_json"] for r in served}) == 1           # same seed, same image
        # the verified artifacts are in the nodes' blob cache, named by their sha256
        fs = s3fs.S3FileSystem(key=h.S3_ENV["AWS_ACCESS_KEY_ID"], secret=h.S3_ENV["AWS_SECRET_ACCESS_KEY"],
                               client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True,
                               use_listings_cache=False)
        (graph,) = [p for p in fs.find(f"{BUCKET}/store/gan") if p.endswith("generate.onnx")]
        manifest_sha = json.loads(fs.cat(graph.rsplit("/", 1)[0] + "/manifest.json"))["files"]["generate.onnx"]["sha256"]
        assert (CACHE / manifest_sha).is_file()

        # tamper: the object no longer matches its manifest; empty the nodes' caches and make the replicas load
        # again (a changed actor option restarts them)
        fs.pipe(graph, fs.cat(graph)[:-1] + b"\x00")
        (CACHE / manifest_sha).unlink()
        tampered = copy.deepcopy(config)
        gan = next(d for d in tampered["applications"][-1]["deployments"] if d["name"] == "gan")
        gan["ray_actor_options"] = {**gan.get("ray_actor_options", {}), "num_cpus": 0.9}
        t1 = time.monotonic()
        cluster.deploy(tampered)

        def refused() -> bool:
            r = h.generate(f"{h.W1.url}{PREFIX}", BODY, timeout=60)
            return r.status == 503 and "does not match its manifest hash" in r.body["error"]["message"]

        h.wait_for("the reloaded replicas to refuse the tampered graph", refused, 300)
        refused_s = time.monotonic() - t1
        error = h.generate(f"{h.W2.url}{PREFIX}", BODY, timeout=60)
        assert error.status == 503 and h.is_openai_error(error), error.body
        assert "/work/" not in error.body["error"]["message"] and "/tmp/" not in error.body["error"]["message"]
        assert not (CACHE / manifest_sha).exists()          # nothing tampered is cached
        # everything else keeps serving: the main application's models, through both workers
        others = answers("", {"model": "vae", "prompt": "bag", "seed": 3}, 4) + answers("", BODY, 4)
        assert all(r.status == 200 for r in others), [r.body for r in others if r.status != 200]
        results.record("s3_store", {"build_into_s3_s": round(built_s, 1),
                                    "served_by": sorted({h.served_by(r) for r in served}),
                                    "tampered_refused_after_s": round(refused_s, 1),
                                    "refusal": error.body["error"]["message"][:300]})
    finally:
        cluster.deploy(cluster.baseline)
        cluster.wait_baseline()
