"""genserve on a multi-host Ray cluster (a head and two workers, each its own network namespace and IP),
deployed the KubeRay way (`serve deploy` to the head's dashboard): every model on both workers, load through
a worker's proxy with `genserve loadtest`, both workers' replicas answering, the same seed giving the same
image bytes on every node, and the cost of the extra hops against a one-node cluster."""
from __future__ import annotations

import collections
import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster import harness as h

SCENARIO = Path(__file__).with_name("cluster_load.yaml")
WORKER_IPS = sorted(w.ip for w in h.WORKERS)


def test_every_model_and_the_ingress_run_on_both_workers(cluster):
    # Serve's view (what `serve status` reads): each deployment's RUNNING replicas and their nodes
    assert cluster.ray.running_nodes() == {name: WORKER_IPS for name in (*h.MODELS, h.INGRESS)}
    # Ray's state API: the replica actors by node; nothing but Serve's controller and a proxy on the head
    actors = cluster.ray.actor_nodes()
    for name in (*h.MODELS, h.INGRESS):
        assert actors[f"ServeReplica:{h.APP}:{name}"] == WORKER_IPS, name
    assert actors["ServeController"] == [h.HEAD.ip]
    assert actors["ProxyActor"] == sorted([h.HEAD.ip, *WORKER_IPS])   # proxy_location: EveryNode
    proxies = cluster.ray.serve_details()["proxies"].values()
    assert sorted((p["node_ip"], p["status"]) for p in proxies) == [(ip, "HEALTHY") for ip in
                                                                     sorted([h.HEAD.ip, *WORKER_IPS])]


def _loadtest(url: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(h.VENV_BIN / "genserve"), "loadtest", str(SCENARIO), "--url", url, "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=h.env(), cwd=h.SRC)


def test_genserve_loadtest_through_each_workers_proxy(cluster, results):
    """The scenario's open loop (4 req/s for 20 s after 2 s of warm-up) against each worker's proxy at once,
    from the root namespace: every request answered, none failed."""
    from loadtests.records import load_run
    from loadtests.scenario import load_scenario

    scenario = load_scenario(SCENARIO)
    expected = int(scenario.warmup_s * scenario.load.stages[0].rate + scenario.load.duration_s * scenario.load.stages[0].rate)
    runs = {w.name: h.ROOT / "runs" / f"loadtest-{w.name}-{int(time.time())}" for w in h.WORKERS}
    procs = {w.name: _loadtest(w.url, runs[w.name]) for w in h.WORKERS}
    bound = scenario.duration_s + scenario.request_timeout_s + 30
    figures = {}
    for w in h.WORKERS:
        try:
            out, _ = procs[w.name].communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert procs[w.name].returncode == 0, out[-3000:]
        run = load_run(runs[w.name])
        assert run.meta["complete"] and len(run.records) == expected, (len(run.records), expected)
        bad = [r for r in run.records if not r.ok]
        assert not bad, [f"#{r.id} {r.requested_model}: {r.status} {r.error}" for r in bad[:10]]
        served = collections.Counter(r.model for r in run.records)
        assert set(served) >= {"gan", "vae", "flow", "diffusion"}, served
        ms = [r.latency_s * 1000 for r in run.records if not r.warmup]
        figures[w.name] = {"url": w.url, "requests": len(run.records), "failed": len(bad),
                           "p50_ms": round(h.percentile(ms, 0.5), 1), "p90_ms": round(h.percentile(ms, 0.9), 1),
                           "p99_ms": round(h.percentile(ms, 0.99), 1), "served": dict(served),
                           "run": str(runs[w.name])}
    results.record("loadtest", {"scenario": str(SCENARIO.relative_to(h.REPO)), "offered_req_s_per_proxy":
                                scenario.load.stages[0].rate, "by_proxy": figures})


def _nodes_behind(url: str, n: int, body: dict) -> tuple[collections.Counter, list[h.Response]]:
    rs = [h.generate(url, body | {"seed": i}) for i in range(n)]
    assert all(r.status == 200 for r in rs), [(r.status, r.body) for r in rs if r.status != 200][:3]
    return collections.Counter(h.served_by(r) for r in rs), rs


def test_replicas_on_both_workers_answer_and_say_so(cluster, results):
    """Requests through the workers' proxies are served by the replicas of both workers (the ingress spreads
    its model calls over every replica of the model), as the X-Genserve-Node header says. Serve's router
    picks between two replicas by their queues, not uniformly, so one proxy's 30 calls may all land on one
    node; across both proxies each model must have used both."""
    by_proxy, by_model = {}, {}
    for model in ("gan", "diffusion"):
        for w in h.WORKERS:
            nodes, rs = _nodes_behind(w.url, 30, {"model": model, "prompt": "sneaker",
                                                  **({"steps": 10} if model == "diffusion" else {})})
            by_proxy[f"{w.name}/{model}"] = dict(nodes)
            by_model.setdefault(model, collections.Counter()).update(nodes)
    results.record("served_by", {"requests_per_proxy_and_model": 30, "nodes": by_proxy})
    missing = [k for k, v in by_proxy.items() if None in v]
    assert not missing, (f"no {h.NODE_HEADER} header (nor body `node`) in the answers through {missing}: the "
                         "ingress does not report which node's replica made the images")
    for model, nodes in by_model.items():
        assert sorted(nodes) == WORKER_IPS, f"{model}: served only by {dict(nodes)}"


SAME_SEED = {"gan": {"n": 4}, "vae": {"n": 2}, "flow": {"n": 2},
             "diffusion": {"n": 2, "sampler": "dpmpp_2m", "steps": 10, "guidance_scale": 2.0}}


@pytest.mark.parametrize("model", list(SAME_SEED))
def test_same_seed_same_png_bytes_on_every_node(cluster, model):
    """The same seeded request, through each worker's proxy in turn, until both workers' replicas have
    answered it (X-Genserve-Node) and at least 20 answers are in (at most 60): byte-identical PNGs every
    time."""
    body = {"model": model, "prompt": "ankle boot", "seed": 1234, **SAME_SEED[model]}
    answers: list[h.Response] = []
    while len(answers) < 60 and (len(answers) < 20 or len({h.served_by(r) for r in answers}) < 2):
        answers.append(r := h.generate(h.WORKERS[len(answers) % 2].url, body))
        assert r.status == 200, r.body
    images = {json.dumps([d["b64_json"] for d in r.body["data"]]) for r in answers}
    assert len(images) == 1, f"{len(images)} different answers to the same seeded request"
    nodes = collections.Counter(h.served_by(r) for r in answers)
    assert sorted(nodes) == WORKER_IPS, f"answers came from {dict(nodes)}, not from both workers"


def test_latency_overhead_against_a_one_node_cluster(cluster, results):
    """The same small GAN request, alternately through the cluster (a worker's proxy; the ingress and the
    model replica may be on either worker) and through a one-node cluster (`ray start --head` in its own
    namespace, the config's one-replica form deployed with `serve deploy`, gan only), running side by side,
    sequentially, after a warm-up: the p50 difference is the multi-host overhead."""
    solo = h.RayCluster(h.SOLO, head_cpus=4)
    try:
        t0 = time.monotonic()
        h.add_host(h.SOLO)
        solo.start()
        solo.deploy(h.single_node_config(h.load_base_config(), str(cluster.store), ("gan",)),
                    path=h.ROOT / "serve_config.solo.yaml")
        solo.wait_running({"gan": {h.SOLO.ip}, h.INGRESS: {h.SOLO.ip}})
        solo_start_s = time.monotonic() - t0
        body = {"model": "gan", "prompt": "sneaker", "n": 1}
        targets = {"solo": h.SOLO.url, "cluster_w1": h.W1.url, "cluster_w2": h.W2.url}
        for url in targets.values():                       # warm-up
            for i in range(10):
                assert h.generate(url, body | {"seed": i}).status == 200
        samples: dict[str, list[float]] = {k: [] for k in targets}
        replica: dict[str, list[float]] = {k: [] for k in targets}
        for i in range(80):
            for key, url in targets.items():
                r = h.generate(url, body | {"seed": 100 + i})
                assert r.status == 200, r.body
                samples[key].append(r.seconds * 1000)
                replica[key].append(r.body["latency_ms"])
        figures = {k: {"p50_ms": round(h.percentile(v, 0.5), 2), "p90_ms": round(h.percentile(v, 0.9), 2),
                       "server_p50_ms": round(h.percentile(replica[k], 0.5), 2)} for k, v in samples.items()}
        cluster_p50 = h.percentile(samples["cluster_w1"] + samples["cluster_w2"], 0.5)
        figures["overhead_p50_ms"] = round(cluster_p50 - figures["solo"]["p50_ms"], 2)
        figures["one_node_startup_s"] = round(solo_start_s, 2)
        figures["request"] = body
        figures["requests_each"] = 80
        results.record("overhead", figures)
        # a sanity bound, not a target: the hops between namespaces cost milliseconds, not tens of them
        assert figures["overhead_p50_ms"] < 50, figures
    finally:
        h.kill_namespace(h.SOLO.ns)
        h.sh("ip", "netns", "del", h.SOLO.ns, check=False)
