"""A multi-host Ray cluster on one Linux machine, for genserve's cluster tests (tests/cluster/, marker
`cluster`, run by scripts/cluster_test.sh as root).

Every "host" is a network namespace with its own IP on a private bridge in the root namespace:

    root ns    gscbr0 10.77.0.1/24       the test process, the load generators, `serve deploy`
    gsc-redis  10.77.0.5                 redis-server: the GCS's external store (GCS fault tolerance)
    gsc-head   10.77.0.10                ray start --head --num-cpus 0 (KubeRay's advice: no replicas on the
                                         head); GCS, dashboard :8265 (the Serve REST API), Serve controller
    gsc-w1     10.77.0.11                ray start --address 10.77.0.10:6379 --num-cpus N: replicas, proxy :8000
    gsc-w2     10.77.0.12                the same
    gsc-solo   10.77.0.20                a one-node cluster (head with CPUs), for the single-node baseline

The namespaces share the filesystem, so the model store is one absolute path every node reads. Each Ray node
has its own --temp-dir under ROOT/nodes/<name>, so nodes do not clash with each other or with any other Ray
on the machine. Nothing here runs `ray stop`: it finds Ray processes by name machine-wide (it would stop
every other Ray on this shared machine, and every node of this cluster at once) and clears
/tmp/ray/ray_current_cluster. A node is stopped the way a machine dies: SIGKILL to every process of its
namespace (`ip netns pids`). Everything is named gsc-* so a crashed run's leftovers can be found and
removed (cleanup_leftovers).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
# The code every node and CLI imports (PYTHONPATH): the working tree, or a copy of it given in
# $GENSERVE_CLUSTER_SRC (to test a snapshot while the tree is being edited).
SRC = Path(os.environ.get("GENSERVE_CLUSTER_SRC") or REPO)
BASE_CONFIG = SRC / "deploy" / "serve_config.yaml"
ROOT = Path(os.environ.get("GENSERVE_CLUSTER_DIR", "/tmp/genserve-cluster"))
PREFIX = "gsc-"                      # every namespace and veth this harness makes
BRIDGE, BRIDGE_IP, SUBNET = "gscbr0", "10.77.0.1", "10.77.0"
APP = "genserve"
INGRESS = "Ingress"
MODELS = ("gan", "vae", "flow", "diffusion", "pixelcnn")
HTTP_PORT, GCS_PORT, DASHBOARD_PORT, REDIS_PORT = 8000, 6379, 8265, 6379
REDIS_PASSWORD = "genserve-cluster"
WORKER_CPUS = 8                      # logical: a scheduling budget (5 models x 1 + ingress + room to autoscale)
OBJECT_STORE_BYTES = 100 * 1024**2   # per node: genserve passes small objects only
# A worker's raylet waits this long for a restarted GCS before it exits (Ray's default: 60 s). KubeRay sets it
# on workers when GCS fault tolerance is on; the head restart in the GCS test takes well under a minute.
GCS_RECONNECT_TIMEOUT_S = 300
# Ray's token authentication, on explicitly, with this session's own token (not ~/.ray/auth_token, which
# other Rays on this machine use): every node, CLI and dashboard request carries it.
# Kept in ROOT/auth_token, so a second process (a debugging shell) can talk to the same cluster; made on
# first use, not at import (the default test run collects this directory too, and must not write anything).
@functools.cache
def auth_token() -> str:
    if token := os.environ.get("GENSERVE_CLUSTER_TOKEN"):
        return token
    path = ROOT / "auth_token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


@dataclass(frozen=True)
class Host:
    name: str                        # head, w1, w2, redis, solo
    ip: str

    @property
    def ns(self) -> str:
        return PREFIX + self.name

    @property
    def veth(self) -> str:          # the root-namespace end, on the bridge (<= 15 characters)
        return f"{PREFIX}{self.name}-h"

    @property
    def url(self) -> str:           # its Serve proxy
        return f"http://{self.ip}:{HTTP_PORT}"

    @property
    def temp_dir(self) -> Path:
        return ROOT / "nodes" / self.name


HEAD, W1, W2 = Host("head", f"{SUBNET}.10"), Host("w1", f"{SUBNET}.11"), Host("w2", f"{SUBNET}.12")
REDIS, SOLO = Host("redis", f"{SUBNET}.5"), Host("solo", f"{SUBNET}.20")
S3 = Host("s3", f"{SUBNET}.6")      # an S3-compatible server (moto), started by the test that uses it
S3_PORT = 9000
# The credentials and endpoint every node (and so every replica) has, from the standard AWS variables only,
# as a real deployment gives them (never in the Serve config); moto takes any key. Harmless for local stores.
S3_ENV = {"AWS_ACCESS_KEY_ID": "genserve-cluster", "AWS_SECRET_ACCESS_KEY": "genserve-cluster-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{S3.ip}:{S3_PORT}"}
WORKERS = (W1, W2)


# ---- processes ------------------------------------------------------------------------------------------

def sh(*argv: str, check: bool = True, timeout: float = 60, env: dict | None = None,
       input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture its output; raise with the output on failure."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input, cwd=SRC)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def env(**extra: str) -> dict[str, str]:
    """The environment every node and CLI runs with: the venv first on PATH, the repo on PYTHONPATH (the
    worker processes import the project from the working tree, with no runtime_env), no RAY_ADDRESS that
    could point anything at another Ray, no usage-stats calls."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("PYTHONPATH",)}
    e.update(PATH=f"{VENV_BIN}:{e.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(SRC),
             RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=auth_token(), **S3_ENV)
    e.update(extra)
    return e


def ns_pids(ns: str) -> list[int]:
    p = sh("ip", "netns", "pids", ns, check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def kill_namespace(ns: str, timeout_s: float = 15) -> int:
    """SIGKILL every process in the namespace, as its machine dying would; returns how many were killed.
    Repeats until none is left (a dying process's children may still be starting)."""
    killed, deadline = 0, time.monotonic() + timeout_s
    while (pids := ns_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    if pids := ns_pids(ns):
        raise RuntimeError(f"processes left in {ns} after SIGKILL: {pids}")
    return killed


def process_pids(ns: str, needle: str) -> list[int]:
    """Processes of the namespace whose command line contains needle."""
    out = []
    for pid in ns_pids(ns):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            out.append(pid)
    return out


# ---- network --------------------------------------------------------------------------------------------

def link_exists(name: str) -> bool:
    return sh("ip", "link", "show", name, check=False).returncode == 0


def cleanup_leftovers(keep_logs: bool = False) -> list[str]:
    """Remove what a crashed run left: every gsc-* namespace (its processes SIGKILLed first), the bridge,
    and (unless keep_logs) the nodes' temp dirs, where their logs are. Returns what it removed."""
    removed = []
    for line in sh("ip", "netns", "list").stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX):
            kill_namespace(ns)
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) or name == BRIDGE:
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    if (ROOT / "nodes").exists() and not keep_logs:
        shutil.rmtree(ROOT / "nodes", ignore_errors=True)
    return removed


def network_up(hosts: tuple[Host, ...]) -> None:
    """The bridge (with the root namespace's address on it) and one namespace per host, loopback up."""
    if not link_exists(BRIDGE):
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
    for h in hosts:
        add_host(h)


def add_host(h: Host) -> None:
    sh("ip", "netns", "add", h.ns)
    sh("ip", "-n", h.ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
    sh("ip", "link", "set", h.veth, "master", BRIDGE)
    sh("ip", "link", "set", h.veth, "up")
    sh("ip", "-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
    sh("ip", "-n", h.ns, "link", "set", "eth0", "up")


def network_down(hosts: tuple[Host, ...]) -> None:
    for h in hosts:
        kill_namespace(h.ns)
        sh("ip", "netns", "del", h.ns, check=False)
    if link_exists(BRIDGE):
        sh("ip", "link", "del", BRIDGE, check=False)


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, interval_s: float = 0.5) -> Any:
    """Poll probe() until it returns something truthy; raise TimeoutError naming `what` and the last value."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except AssertionError:
            raise               # the probe saw a failure that waiting will not mend
        except Exception as exc:  # noqa: BLE001  (a server still starting refuses connections)
            last = exc
        else:
            if last:
                return last
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (last: {str(last)[:1500]})")


# ---- HTTP -----------------------------------------------------------------------------------------------

@dataclass
class Response:
    status: int                      # 0: no answer (connection error, timeout)
    headers: dict[str, str]
    body: Any                        # decoded JSON, else the text
    seconds: float
    error: str | None = None


def http(method: str, url: str, body: dict | None = None, timeout: float = 30, token: bool = False) -> Response:
    """One request; token: send the cluster's Ray auth token (the dashboard's APIs need it)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json"} | ({"authorization": f"Bearer {auth_token()}"} if token else {})
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        status, headers, raw = err.code, dict(err.headers), err.read()
    except (OSError, urllib.error.URLError) as exc:
        return Response(0, {}, None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - t0
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = raw.decode(errors="replace")
    return Response(status, {k.lower(): v for k, v in headers.items()}, decoded, seconds)


def generate(url: str, body: dict, timeout: float = 30) -> Response:
    return http("POST", url.rstrip("/") + "/v1/images/generations", body, timeout)


def is_openai_error(r: Response) -> bool:
    """A clean failure: a 4xx/5xx whose body is OpenAI's {"error": {"message": ...}}."""
    return (400 <= r.status < 600 and isinstance(r.body, dict) and isinstance(r.body.get("error"), dict)
            and isinstance(r.body["error"].get("message"), str) and r.body["error"]["message"] != "")


NODE_HEADER = "x-genserve-node"


def served_by(r: Response) -> str | None:
    """The Ray node IP of the replica that made the images: the X-Genserve-Node header (the body's `node`
    as a fallback), None when the server reports neither."""
    if r.headers.get(NODE_HEADER):
        return r.headers[NODE_HEADER]
    return r.body.get("node") if isinstance(r.body, dict) else None


# ---- the Serve config -----------------------------------------------------------------------------------

def load_base_config() -> dict:
    return yaml.safe_load(BASE_CONFIG.read_text())


def cluster_config(base: dict, store: str, *, replicas: int = 2, models: tuple[str, ...] | None = None,
                   autoscale: dict[str, dict] | None = None, user_config: dict[str, dict] | None = None,
                   refs: dict[str, str] | None = None, ingress_cpus: float = 0.01) -> dict:
    """deploy/serve_config.yaml adapted to a cluster of `replicas` worker nodes, idempotently (a config that
    already says so comes out the same):

    - args.store: `store` (an absolute path every node reads);
    - a proxy on every node, HTTP on 0.0.0.0:8000;
    - every model deployment and the Ingress: `replicas` replicas, max_replicas_per_node 1, so each is on
      every worker and a dead node takes one replica of each with it, never the only one. A model's count is
      an autoscaling_config with min = max = replicas (keeping the config's custom `policy`), never
      num_replicas: Serve hashes the list of the deployments' autoscaling policies into the application's
      code version, so switching one deployment between num_replicas and autoscaling, or dropping a policy,
      would restart every replica of the app, where changing an autoscaling_config's bounds is a live
      update. The Ingress reserves `ingress_cpus` CPU when the config
      gives it none, so it is never placed on the head, which has no CPUs (a replica there would die with
      the head, the node the GCS test restarts);
    - models: only these (default: every one the config serves); refs: name -> the store ref to serve it
      from (e.g. pin gan to a version); user_config: name -> keys to change;
    - autoscale: name -> that deployment's Serve autoscaling_config (over the config's `policy`)."""
    config = copy.deepcopy(base)
    config["proxy_location"] = "EveryNode"
    config.setdefault("http_options", {}).update(host="0.0.0.0", port=HTTP_PORT)
    app = next(a for a in config["applications"] if a.get("import_path") == "serving.app:build_app")
    args = app.setdefault("args", {})
    args["store"] = store
    entries = list(args.get("models", []))

    def name_of(e: Any) -> str:
        return e.partition("@")[0] if isinstance(e, str) else e["name"]

    if models is not None:
        entries = [e for e in entries if name_of(e) in models]
    for name, ref in (refs or {}).items():
        entries = [ref if name_of(e) == name else e for e in entries]
    args["models"] = entries
    served = {name_of(e) for e in entries}
    app["deployments"] = [d for d in app.get("deployments", []) if d["name"] == INGRESS or d["name"] in served]
    for d in app["deployments"]:
        options = d.setdefault("ray_actor_options", {})
        d["max_replicas_per_node"] = 1
        if d["name"] == INGRESS:
            if not options.get("num_cpus"):
                options["num_cpus"] = ingress_cpus
            d.pop("autoscaling_config", None)
            d["num_replicas"] = replicas
            continue
        d.pop("num_replicas", None)
        policy = {k: v for k, v in (d.get("autoscaling_config") or {}).items() if k == "policy"}
        d["autoscaling_config"] = {**policy, **((autoscale or {}).get(d["name"])
                                                or {"min_replicas": replicas, "max_replicas": replicas})}
        if user_config and d["name"] in user_config:
            d["user_config"] = {**(d.get("user_config") or {}), **user_config[d["name"]]}
    return config


def single_node_config(base: dict, store: str, models: tuple[str, ...]) -> dict:
    """The config as one node serves it (one replica each), for the same-request baseline."""
    return cluster_config(base, store, replicas=1, models=models)


# ---- a Ray cluster in namespaces ------------------------------------------------------------------------

@dataclass
class RayCluster:
    """A Ray head and workers, each a Host; `redis` makes the GCS fault tolerant (RAY_REDIS_ADDRESS)."""

    head: Host
    workers: tuple[Host, ...] = ()
    head_cpus: float = 0
    worker_cpus: float = WORKER_CPUS
    redis: Host | None = None
    storage_namespace: str = field(default_factory=lambda: f"genserve-cluster-{os.getpid()}-{int(time.time())}")
    log: Callable[[str], None] = print

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (self.head, *self.workers) + ((self.redis,) if self.redis else ())

    def _node_env(self) -> dict[str, str]:
        return env(RAY_gcs_rpc_server_reconnect_timeout_s=str(GCS_RECONNECT_TIMEOUT_S))

    def start_redis(self) -> None:
        assert self.redis is not None
        d = ROOT / "nodes" / self.redis.name
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "redis.log", "ab") as log:
            # no persistence: its data lives exactly as long as this test session's cluster
            subprocess.Popen(["ip", "netns", "exec", self.redis.ns, "redis-server", "--bind", "0.0.0.0",
                              "--port", str(REDIS_PORT), "--requirepass", REDIS_PASSWORD, "--save", "",
                              "--appendonly", "no", "--protected-mode", "no", "--dir", str(d)],
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for("redis", lambda: sh("ip", "netns", "exec", self.redis.ns, "redis-cli", "-a", REDIS_PASSWORD,
                                     "--no-auth-warning", "ping", check=False).stdout.strip() == "PONG", 20, 0.2)

    def _ray_start(self, host: Host, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        host.temp_dir.mkdir(parents=True, exist_ok=True)
        e = self._node_env() | (extra_env or {})
        with open(host.temp_dir / "ray-start.log", "ab") as log:
            p = subprocess.run(["ip", "netns", "exec", host.ns, str(VENV_BIN / "ray"), "start",
                                "--node-ip-address", host.ip, "--temp-dir", str(host.temp_dir),
                                "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats", *args],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=e, cwd=SRC,
                               timeout=180)
        if p.returncode != 0:
            tail = (host.temp_dir / "ray-start.log").read_text()[-3000:]
            raise RuntimeError(f"ray start on {host.name} exited {p.returncode}:\n{tail}")

    def start_head(self) -> None:
        extra, args = {}, ["--head", "--port", str(GCS_PORT), "--num-cpus", str(self.head_cpus),
                           "--dashboard-host", "0.0.0.0", "--dashboard-port", str(DASHBOARD_PORT),
                           "--include-dashboard", "true"]
        if self.redis:
            extra = {"RAY_REDIS_ADDRESS": f"{self.redis.ip}:{REDIS_PORT}",
                     "RAY_external_storage_namespace": self.storage_namespace}
            args += ["--redis-password", REDIS_PASSWORD]
        self._ray_start(self.head, args, extra)
        wait_for("the dashboard", lambda: http("GET", self.dashboard + "/api/version", timeout=5, token=True).status == 200, 90)

    def start_worker(self, host: Host) -> None:
        self._ray_start(host, ["--address", f"{self.head.ip}:{GCS_PORT}", "--num-cpus", str(self.worker_cpus)])

    def start(self) -> float:
        """Redis (if any), the head, the workers; wait until every node is alive. Returns seconds taken."""
        t0 = time.monotonic()
        if self.redis:
            self.start_redis()
        self.start_head()
        for w in self.workers:
            self.start_worker(w)
        self.wait_nodes({self.head.ip, *(w.ip for w in self.workers)})
        return time.monotonic() - t0

    def restart_head(self) -> None:
        """What KubeRay does when the head's GCS dies: the head pod goes (every process of its namespace
        killed) and a new one starts with the same IP and the same Redis, with a fresh filesystem: the
        address file a `ray start --head` leaves in its temp dir is removed first (with it there, `ray
        start` sees the workers' --gcs-address flags in the process list and refuses: "already running")."""
        kill_namespace(self.head.ns)
        (self.head.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        self.start_head()

    def kill_node(self, host: Host) -> int:
        return kill_namespace(host.ns)

    def stop(self) -> None:
        for h in (*self.workers, self.head) + ((self.redis,) if self.redis else ()):
            kill_namespace(h.ns)

    # -- the state API (the dashboard's REST API, from the root namespace) --

    def nodes(self) -> list[dict]:
        r = http("GET", self.dashboard + "/api/v0/nodes?limit=100&detail=1", timeout=10, token=True)
        if r.status != 200:
            raise RuntimeError(f"GET /api/v0/nodes: {r.status} {str(r.body)[:300]}")
        return r.body["data"]["result"]["result"]

    def alive_ips(self) -> set[str]:
        return {n["node_ip"] for n in self.nodes() if n["state"] == "ALIVE"}

    def wait_nodes(self, ips: set[str], timeout_s: float = 120) -> None:
        wait_for(f"ray nodes {sorted(ips)} alive", lambda: ips <= self.alive_ips(), timeout_s)

    def actors(self) -> list[dict]:
        """The cluster's ALIVE actors (Ray's state API): class_name, name, node_id, pid, ..."""
        r = http("GET", self.dashboard + "/api/v0/actors?limit=10000&filter_keys=state&filter_predicates=%3D"
                 "&filter_values=ALIVE", timeout=10, token=True)
        if r.status != 200:
            raise RuntimeError(f"GET /api/v0/actors: {r.status} {str(r.body)[:300]}")
        return r.body["data"]["result"]["result"]

    def actor_nodes(self) -> dict[str, list[str]]:
        """Actor class name -> the node IPs its ALIVE actors run on (sorted), from Ray's state API."""
        ip_of = {n["node_id"]: n["node_ip"] for n in self.nodes()}
        out: dict[str, list[str]] = {}
        for a in self.actors():
            out.setdefault(a["class_name"], []).append(ip_of.get(a["node_id"], a["node_id"]))
        return {k: sorted(v) for k, v in out.items()}

    def serve_details(self) -> dict:
        r = http("GET", self.dashboard + "/api/serve/applications/", timeout=10, token=True)
        if r.status != 200:
            raise RuntimeError(f"GET /api/serve/applications/: {r.status} {str(r.body)[:300]}")
        return r.body

    def app_status(self) -> str:
        apps = self.serve_details().get("applications") or {}
        return apps[APP]["status"] if APP in apps else "NOT_STARTED"

    def replicas(self) -> dict[str, list[dict]]:
        """deployment -> its replicas ({replica_id, state, node_ip, ...}), from Serve's REST API."""
        app = (self.serve_details().get("applications") or {}).get(APP) or {}
        return {name: d.get("replicas", []) for name, d in (app.get("deployments") or {}).items()}

    def running_nodes(self) -> dict[str, list[str]]:
        """deployment -> the node IPs of its RUNNING replicas (sorted)."""
        return {name: sorted(r["node_ip"] for r in reps if r["state"] == "RUNNING")
                for name, reps in self.replicas().items()}

    def deploy(self, config: dict, path: Path | None = None) -> None:
        """`serve deploy CONFIG --address http://HEAD:8265`, as KubeRay submits serveConfigV2."""
        path = path or ROOT / "serve_config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        sh(str(VENV_BIN / "serve"), "deploy", str(path), "--address", self.dashboard, env=env(), timeout=120)

    def wait_running(self, expect: dict[str, set[str]] | None = None, timeout_s: float = 300) -> None:
        """Until the app is RUNNING and, if given, each deployment's RUNNING replicas are exactly on the
        expected node IPs (and none is starting or stopping). Raises AssertionError on DEPLOY_FAILED, and
        TimeoutError with the app's state at the timeout."""
        def probe():
            details = self.serve_details()
            app = (details.get("applications") or {}).get(APP)
            if app is None:
                return False
            if app["status"] == "DEPLOY_FAILED":   # UNHEALTHY may mend: a lost node's replicas restarting
                raise AssertionError(f"application {APP} is {app['status']}: {app.get('message', '')[:3000]}")
            if app["status"] != "RUNNING":
                return False
            if expect is None:
                return True
            deps = app.get("deployments") or {}
            for name, ips in expect.items():
                reps = deps.get(name, {}).get("replicas", [])
                if any(r["state"] != "RUNNING" for r in reps):
                    return False
                if sorted(r["node_ip"] for r in reps) != sorted(ips):
                    return False
            return True

        def last_state():
            try:
                app = (self.serve_details().get("applications") or {}).get(APP) or {}
                return {"status": app.get("status"), "message": (app.get("message") or "")[:1000],
                        "nodes": self.running_nodes()}
            except Exception as exc:  # noqa: BLE001
                return exc

        try:
            wait_for("serve app RUNNING", probe, timeout_s, 1.0)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; state: {last_state()}") from None


def every_model_on(ips: set[str], models: tuple[str, ...] = MODELS) -> dict[str, set[str]]:
    """The wait_running expectation: every model and the Ingress has one replica on each of `ips`."""
    return {name: set(ips) for name in (*models, INGRESS)}


# ---- the store and the CLIs -----------------------------------------------------------------------------

def genserve(*argv: str, timeout: float = 300) -> str:
    return sh(str(VENV_BIN / "genserve"), *argv, env=env(), timeout=timeout).stdout


def build_store(store: Path) -> float:
    """`genserve build --store STORE` (a latency profile up to batch 2 only, as the default tests build, to
    keep it to seconds). Returns seconds taken."""
    t0 = time.monotonic()
    genserve("--threads", "1", "build", "--store", str(store), "--max-batch", "2", timeout=600)
    return time.monotonic() - t0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
