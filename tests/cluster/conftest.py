"""The cluster tests' fixtures: ONE multi-host Ray cluster (tests/cluster/harness.py) per session, with
genserve deployed on it by `serve deploy`, and the figures the tests measure, written at the end of the
session to benchmarks/results/cluster.json.

Every test module here is marked `cluster` (excluded from the default run) and needs root (network
namespaces), iproute2 and redis-server; scripts/cluster_test.sh runs them. Cleanup: leftovers of a crashed
run (gsc-* namespaces and their processes, the bridge) are removed before the cluster starts, and
everything started is removed at the end of the session, whatever happened."""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness as h

RESULTS = h.REPO / "benchmarks" / "results" / "cluster.json"


ORDER = ("test_serving", "test_autoscaling", "test_faults")   # the most disruptive last


def pytest_collection_modifyitems(items):
    # Every test in this directory needs the cluster: mark them, whatever the module says; run the modules
    # in ORDER (tests keep their order within a module).
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.cluster)

    def key(item):
        path = Path(str(item.fspath))
        return ORDER.index(path.stem) if path.parent == here and path.stem in ORDER else -1

    items.sort(key=key)   # stable: other directories' tests keep their place


def _missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "the cluster tests need root (network namespaces)"
    for tool in ("ip", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"the cluster tests need {tool} (apt-get install -y iproute2 redis-server)"
    if not (h.VENV_BIN / "ray").exists():
        return f"no {h.VENV_BIN / 'ray'}: run scripts/setup.sh --test"
    return None


class Results:
    """The figures of this session, by section; merged into benchmarks/results/cluster.json at the end (a
    section this session did not measure keeps its last value). With $GENSERVE_CLUSTER_LABEL set (e.g. a run
    of older code through $GENSERVE_CLUSTER_SRC), sections are stored as "section:label" beside the others."""

    def __init__(self):
        self.sections: dict[str, Any] = {}
        self.label = os.environ.get("GENSERVE_CLUSTER_LABEL", "")

    def record(self, section: str, figures: dict[str, Any]) -> None:
        if self.label:
            section = f"{section}:{self.label}"
        self.sections[section] = {**figures, "measured_at": _now(), "code": _code(),
                                  "machine_load_1m": round(os.getloadavg()[0], 1)}
        print(f"\n[cluster] {section}: {json.dumps(figures)}")

    def write(self) -> None:
        if not self.sections:
            return
        data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        data.update(self.sections)
        data["environment"] = _environment()
        data["updated_at"] = _now()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _code() -> str:
    """What the cluster ran: the working tree's commit (and whether it had changes), or the snapshot that
    $GENSERVE_CLUSTER_SRC names ($GENSERVE_CLUSTER_SRC_REV: its revision, as scripts/cluster_test.sh --rev
    sets it)."""
    if h.SRC != h.REPO:
        return f"{os.environ.get('GENSERVE_CLUSTER_SRC_REV') or 'a copy'} in {h.SRC}"
    commit = subprocess.run(["git", "-C", str(h.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(h.REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip() != ""
    return f"{commit}{' + uncommitted changes' if dirty else ''} (working tree)"


def _environment() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"machine": f"{os.cpu_count()} cores ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "topology": "head (0 CPUs) + 2 workers (8 logical CPUs each) + redis, each a network namespace "
                        "on one machine, sharing its 2 cores",
            "ray": version("ray"),
            "note": "other sessions' test suites shared the 2 cores during these runs: machine_load_1m is the "
                    "1-minute load average when each section was measured"}


@pytest.fixture(scope="session")
def results():
    r = Results()
    yield r
    r.write()


class Cluster:
    """The session's cluster: the Ray nodes (ray), the store every node reads, the baseline config (every
    model and the Ingress on both workers) and helpers to get back to it after a test changed things."""

    def __init__(self, ray: h.RayCluster, store: Path):
        self.ray, self.store = ray, store
        self.baseline = h.cluster_config(h.load_base_config(), str(store))
        self.deployed: dict | None = None

    def config(self, **changes: Any) -> dict:
        """The baseline with changes (harness.cluster_config's keywords)."""
        return h.cluster_config(h.load_base_config(), str(self.store), **changes)

    def deploy(self, config: dict) -> None:
        self.ray.deploy(config)
        self.deployed = config

    def wait_baseline(self, timeout_s: float = 300) -> None:
        self.ray.wait_running(h.every_model_on({w.ip for w in h.WORKERS}), timeout_s=timeout_s)

    def ensure_baseline(self) -> None:
        """Every node alive (restart what a failed test left dead) and the baseline config RUNNING with every
        model on both workers."""
        try:
            alive = self.ray.alive_ips()
        except Exception:  # noqa: BLE001  the head itself is gone
            alive = set()
        if h.HEAD.ip not in alive:
            self.ray.restart_head()
            self.ray.wait_nodes({h.HEAD.ip, *(w.ip for w in h.WORKERS)}, timeout_s=120)
            alive = self.ray.alive_ips()
        for w in h.WORKERS:
            if w.ip not in alive:
                h.kill_namespace(w.ns)
                self.ray.start_worker(w)
        self.ray.wait_nodes({h.HEAD.ip, *(w.ip for w in h.WORKERS)})
        if self.deployed != self.baseline:
            self.deploy(self.baseline)
        self.wait_baseline()


@pytest.fixture(scope="session")
def cluster_session(results):
    if reason := _missing_prerequisites():
        pytest.skip(reason)
    h.cleanup_leftovers()
    hosts = (h.REDIS, h.HEAD, *h.WORKERS)
    ray = h.RayCluster(h.HEAD, h.WORKERS, redis=h.REDIS)
    store = h.ROOT / "store"
    try:
        shutil.rmtree(store, ignore_errors=True)
        build_s = h.build_store(store)
        t0 = time.monotonic()
        h.network_up(hosts)
        t_net = time.monotonic()
        ray.start()
        t_ray = time.monotonic()
        cluster = Cluster(ray, store)
        cluster.deploy(cluster.baseline)
        t_deploy = time.monotonic()
        cluster.wait_baseline()
        t_running = time.monotonic()
        results.record("startup", {
            "namespaces_s": round(t_net - t0, 2),
            "ray_nodes_up_s": round(t_ray - t_net, 2),          # redis, head, 2 workers: all ALIVE
            "serve_deploy_cmd_s": round(t_deploy - t_ray, 2),   # `serve deploy` returns
            "app_running_s": round(t_running - t_deploy, 2),    # every model + Ingress RUNNING on both workers
            "total_s": round(t_running - t0, 2),
            "store_build_s": round(build_s, 2),                 # before, not counted: `genserve build`
            "replicas": {name: len(ips) for name, ips in ray.running_nodes().items()}})
        yield cluster
    finally:
        h.network_down((h.SOLO, *hosts))
        h.cleanup_leftovers(keep_logs=True)   # the nodes' logs stay in ROOT/nodes until the next run


TEST_LIMIT_S = int(os.environ.get("GENSERVE_CLUSTER_TEST_LIMIT_S", "420"))


class TestTimeout(Exception):
    pass


@pytest.fixture(autouse=True)
def time_limit():
    """Each test (after the session's cluster start) fails after TEST_LIMIT_S instead of hanging; its
    fixtures' finalizers still run."""
    def expire(*_):
        raise TestTimeout(f"test exceeded {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def cluster(cluster_session) -> Cluster:
    """The session's cluster, checked back to the baseline before the test."""
    cluster_session.ensure_baseline()
    return cluster_session
