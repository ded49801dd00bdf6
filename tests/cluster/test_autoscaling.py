"""Serve's autoscaler on the cluster: diffusion with autoscaling_config (1 to 2 replicas, short delays, over
the config's own policy: genserve's row-demand policy where deploy/serve_config.yaml names it, else Serve's
default on a small target_ongoing_requests) scales up onto the second worker under a load step and back
down when idle; the time each takes and the latency around it are measured. The replica's row budget is cut
to 4 rows (user_config max_batch_rows) so that a load this 2-core machine can carry fills it."""
from __future__ import annotations

import threading
import time

from tests.cluster import harness as h
from tests.cluster.load import ClosedLoad, failures, summarize

AUTOSCALE = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 0.5,
             "upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 2, "metrics_interval_s": 0.5}
ROWS = {"max_batch_rows": 4}
# 50-step guided DDIM runs of 2 images: 4 rows, a whole row budget each, from USERS clients in a closed loop
# (each sends its next request when its last is answered): with one replica its row demand is USERS budgets
# (policy target: 0.75) and its ongoing requests USERS (Serve's default policy, target 0.5), whatever this
# shared machine's speed; two replicas carry it
STEP = {"model": "diffusion", "prompt": "trouser", "n": 2, "sampler": "ddim", "steps": 50}
USERS, LOAD_S = 3, 40


class ReplicaWatch:
    """Polls Serve's REST API twice a second: (time, the deployment's target replica count, the node IPs of
    its RUNNING replicas)."""

    def __init__(self, ray: h.RayCluster, deployment: str):
        self.ray, self.deployment, self.samples = ray, deployment, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                app = self.ray.serve_details()["applications"][h.APP]["deployments"][self.deployment]
                running = sorted(r["node_ip"] for r in app.get("replicas", []) if r["state"] == "RUNNING")
                self.samples.append((time.monotonic(), app.get("target_num_replicas"), running))
            except Exception:  # noqa: BLE001  (a slow answer: the next poll will do)
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> ReplicaWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def first(self, since: float, count: int) -> tuple[float, list[str]] | None:
        """When the deployment first had `count` RUNNING replicas after `since`, and where."""
        return next(((t, ips) for t, _, ips in self.samples if t >= since and len(ips) == count), None)

    def decided(self, since: float, count: int) -> float | None:
        """When the autoscaler first set the target to `count` after `since`."""
        return next((t for t, target, _ in self.samples if t >= since and target == count), None)


def _deployment(config: dict, name: str) -> dict:
    return next(d for a in config["applications"] for d in a["deployments"] if d["name"] == name)


def test_diffusion_scales_up_onto_the_second_worker_and_back_down(cluster, results):
    ray = cluster.ray
    try:
        cluster.deploy(cluster.config(autoscale={"diffusion": AUTOSCALE}, user_config={"diffusion": ROWS}))
        h.wait_for("diffusion down to its 1 minimum replica", lambda: len(ray.running_nodes()["diffusion"]) == 1
                   and all(r["state"] == "RUNNING" for r in ray.replicas()["diffusion"]), 120)
        ray.wait_running()
        (first,) = ray.running_nodes()["diffusion"]
        with ReplicaWatch(ray, "diffusion") as watch:
            time.sleep(2)
            load = ClosedLoad([w.url for w in h.WORKERS], [STEP], 0, LOAD_S, concurrency=USERS,
                              deadline_s=60).start()
            records = load.join()
            t_end = max(r.t_done for r in records)
            up = watch.first(load.t0, 2)
            assert up is not None, f"diffusion never had 2 RUNNING replicas under load: {watch.samples[-5:]}"
            h.wait_for("diffusion back to 1 replica", lambda: watch.first(max(t_end, up[0]), 1) is not None, 120)
        down = watch.first(max(t_end, up[0]), 1)
        decided_up = watch.decided(load.t0, 2)
        decided_down = watch.decided(max(t_end, decided_up or up[0]), 1)
        rejected = [r for r in records if r.status == 429]
        figures = {
            "autoscaling_config": _deployment(cluster.deployed, "diffusion")["autoscaling_config"], "user_config": ROWS,
            "load": f"{USERS} closed-loop users of {STEP} for {LOAD_S} s, both proxies",
            "scale_up_decided_s": decided_up and round(decided_up - load.t0, 2),
            "scale_up_running_s": round(up[0] - load.t0, 2),
            "scale_down_decided_after_idle_s": decided_down and round(decided_down - t_end, 2),
            "scale_down_done_after_idle_s": round(down[0] - t_end, 2),
            "replica_nodes": {"before": [first], "scaled_up": up[1], "after": down[1]},
            "rejected_429": len(rejected),
            "before_scale_up": summarize(records, until=up[0]), "after_scale_up": summarize(records, since=up[0]),
            "all": summarize(records)}
        results.record("autoscaling", figures)
        assert sorted(up[1]) == sorted(w.ip for w in h.WORKERS), up   # the new replica is on the other worker
        # Admission control may turn requests away with a clean 429 while the one replica is overloaded (that
        # is its job, and how many depends on how loaded this shared machine is); anything else is a failure
        assert all(r.ok or (r.status == 429 and r.clean) for r in records), failures(records, load.t0)
    finally:
        cluster.deploy(cluster.baseline)
        cluster.wait_baseline()
