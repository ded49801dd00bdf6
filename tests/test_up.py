"""`genserve up` as a user runs it, in a subprocess: it serves, Ctrl-C at any moment (start-up included) stops
it within seconds and leaves no Ray process or port behind, it starts its own Ray even where `ray start` left
a cluster running, and with --address it deploys onto that cluster through the Serve REST API and removes
its application again on Ctrl-C, leaving the cluster up."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from families.checkpoint import CHECKPOINT_ROOT
from genserve.build import publish_checkpoint
from genserve.launch import load_config, on_one_node
from model_store import ModelStore
from tests.helpers import free_port

GENSERVE = [sys.executable, "-m", "genserve.cli"]
RAY = str(Path(sys.executable).with_name("ray"))
STOP_WITHIN_S = 20      # Ctrl-C to exit, Ray shut down included
READY_WITHIN_S = 180    # a cold embedded Ray + one model on this 2-core machine takes ~20-40 s


def descendants(pid: int) -> set[psutil.Process]:
    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


def alive(procs: set[psutil.Process], within_s: float = 15.0) -> set[int]:
    """The pids among procs still running (not zombies) after up to within_s."""
    deadline = time.monotonic() + within_s
    while True:
        running = {p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.5)


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is not a listener
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def gan_store(tmp_path_factory) -> ModelStore:
    store = ModelStore.open(tmp_path_factory.mktemp("up") / "store")
    publish_checkpoint(store, CHECKPOINT_ROOT / "gan", max_batch=2, threads=1, log=lambda _: None)
    return store


def start_up(*args: str) -> subprocess.Popen:
    """`genserve up` as a terminal's foreground job: Ctrl-C (SIGINT) at its default. A CI job run in the
    background has SIGINT ignored, which a child inherits, and an ignored Ctrl-C stays ignored (as Unix tools
    do): it could never stop `up` then."""
    return subprocess.Popen([*GENSERVE, "up", "--no-build", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"}, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout_s: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            lines.append(line.rstrip())
            if line.startswith(prefix):
                return lines
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.2)
    raise AssertionError(f"no line starting {prefix!r} within {timeout_s} s; output:\n" + "\n".join(lines))


def interrupt(proc: subprocess.Popen) -> tuple[float, set[psutil.Process]]:
    """Ctrl-C; how long it took to exit, and every process that descended from it meanwhile (Ray's daemons,
    agents and workers: these must all be gone after). Other Ray instances on the machine are not looked at."""
    start, seen = time.monotonic(), descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    while proc.poll() is None and time.monotonic() - start < STOP_WITHIN_S + 30:
        seen |= descendants(proc.pid)
        time.sleep(0.1)
    took = time.monotonic() - start
    if proc.poll() is None:  # it did not stop: kill what it started, so that a failing test leaves nothing behind
        for p in seen | descendants(proc.pid):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.kill()
    proc.wait(timeout=10)
    return took, seen


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("after_s", [1.0, 5.0])
def test_ctrl_c_during_start_up_leaves_nothing_behind(gan_store, after_s):
    port = free_port()
    proc = start_up("--store", gan_store.uri, "--port", str(port))
    time.sleep(after_s)  # 1 s: inside Python's imports or ray.init; 5 s: Ray's processes are starting
    took, started = interrupt(proc)
    # 0: `up` stopped what it had started; 130: Ctrl-C came in the CLI's imports (main() reports it as a shell
    # does); 1 / -SIGINT: it came inside Python's own start-up, before any genserve code ran
    assert took < STOP_WITHIN_S and proc.returncode in (0, 130, 1, -signal.SIGINT)
    assert alive(started) == set()
    assert port_free(port)


def test_serves_on_loopback_then_ctrl_c_stops_it(gan_store):
    port = free_port()
    proc = start_up("--store", gan_store.uri, "--port", str(port))
    try:
        lines = wait_for_line(proc, "genserve: serving", READY_WITHIN_S)
        assert f"http://127.0.0.1:{port}/v1" in lines[-1]
        models = get_json(f"http://127.0.0.1:{port}/v1/models")
        assert [m["id"] for m in models["data"]] == ["gan"]
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                     and c.laddr.port == port}
        assert listening == {"127.0.0.1"}   # not every interface: --host opens it
    finally:
        took, started = interrupt(proc)
    assert took < STOP_WITHIN_S and proc.returncode == 0
    assert len(started) > 3 and alive(started) == set()   # raylet, GCS, agents, workers: none left
    assert port_free(port)


def serve_details(dashboard: str) -> dict:
    from genserve.launch import _serve_client

    return _serve_client(dashboard).get_serve_details()


def processes_under(temp_dir: Path) -> set[psutil.Process]:
    """The processes of the Ray started with this --temp-dir (the daemons name it on their command line) and
    every descendant of them (agents and workers, which do not)."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    return {q for p in roots for q in [p, *p.children(recursive=True)]}


def test_ctrl_c_lets_the_requests_in_flight_finish(tmp_path):
    """Graceful shutdown: Ctrl-C while a generation runs; its client still gets its 200, then up exits."""
    store = ModelStore.open(tmp_path / "store")
    publish_checkpoint(store, CHECKPOINT_ROOT / "diffusion", max_batch=2, threads=1, log=lambda _: None)
    port = free_port()
    proc = start_up("--store", store.uri, "--port", str(port))
    answer: dict = {}
    try:
        wait_for_line(proc, "genserve: serving", READY_WITHIN_S)
        body = json.dumps({"model": "diffusion", "prompt": "bag", "n": 4, "steps": 150, "seed": 3,
                           "best_effort": True}).encode()  # past the default SLO: served however long it takes
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", body,
                                         {"content-type": "application/json"})

        def send() -> None:
            start = time.monotonic()
            with urllib.request.urlopen(request, timeout=120) as r:
                answer.update(status=r.status, seconds=time.monotonic() - start, body=json.loads(r.read()))

        client = threading.Thread(target=send)
        client.start()
        time.sleep(1.0)               # the request is in the step batch (150 guided steps take seconds here)
    finally:
        took, started = interrupt(proc)
    client.join(60)
    assert answer.get("status") == 200 and len(answer["body"]["data"]) == 4, answer
    assert answer["seconds"] > 1.0 and proc.returncode == 0 and alive(started) == set()


@pytest.fixture
def ray_start_cluster():
    """A one-node cluster started the way a user does with `ray start --head` (its own temp dir, so that only
    its processes are stopped afterwards, not `ray stop`'s every Ray on the machine); yields its dashboard URL
    and its processes' pids."""
    gcs, dashboard = free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="gs-ray-"))  # short: Ray's socket paths under it must fit in 107 bytes
    done = subprocess.run([RAY, "start", "--head", "--port", str(gcs), "--num-cpus", "2", "--include-dashboard",
                           "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                           "--temp-dir", str(temp), "--min-worker-port", "0", "--max-worker-port", "0",
                           "--disable-usage-stats"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    started = processes_under(temp)
    try:
        yield f"http://127.0.0.1:{dashboard}", {p.pid for p in started}
    finally:
        for proc in started | processes_under(temp):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def test_up_beside_a_ray_start_cluster_runs_its_own_ray(gan_store, ray_start_cluster):
    _, cluster = ray_start_cluster
    port = free_port()
    proc = start_up("--store", gan_store.uri, "--port", str(port))
    try:
        wait_for_line(proc, "genserve: serving", READY_WITHIN_S)
        assert get_json(f"http://127.0.0.1:{port}/v1/models")["data"]
    finally:
        _, started = interrupt(proc)
    assert proc.returncode == 0
    assert alive(started) == set()
    assert all(psutil.pid_exists(p) for p in cluster)   # the user's cluster is untouched


def test_address_deploys_onto_the_cluster_and_ctrl_c_removes_it(gan_store, ray_start_cluster, tmp_path):
    dashboard, cluster = ray_start_cluster
    config = on_one_node(load_config())   # the cluster here is one node
    app = config["applications"][0]
    app["args"]["models"] = ["gan@latest"]
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("Ingress", "gan")]
    config.pop("grpc_options")
    (path := tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = start_up("--address", dashboard, "--config", str(path), "--store", gan_store.uri, "--port", str(port))
    try:
        wait_for_line(proc, "genserve: deployed", READY_WITHIN_S)
        assert [m["id"] for m in get_json(f"http://127.0.0.1:{port}/v1/models")["data"]] == ["gan"]
        assert serve_details(dashboard)["applications"]["genserve"]["status"] == "RUNNING"
    finally:
        interrupt(proc)
    assert proc.returncode == 0
    assert serve_details(dashboard).get("applications", {}) == {}
    assert all(psutil.pid_exists(p) for p in cluster)


def test_a_start_up_that_swallows_ctrl_c_is_stopped_anyway(tmp_path):
    """Ray's start-up can catch the KeyboardInterrupt itself (or hang its teardown): `up` still ends within
    FORCED_STOP_S of the Ctrl-C, and kills what it started. Here start-up is a loop that ignores every
    interrupt and has a child process running."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from genserve import up\n"
        "up.FORCED_STOP_S = 2.0\n"
        "def stuck(args):\n"
        "    child = None\n"
        "    while True:\n"
        "        try:\n"
        "            if child is None:\n"
        "                child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "                print(child.pid, flush=True)\n"
        "            time.sleep(0.1)\n"
        "        except KeyboardInterrupt:\n"
        "            pass\n"
        "up._up_alone = stuck\n"
        "up.run_up(type('Args', (), {'address': None})())\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    child = psutil.Process(int(proc.stdout.readline()))
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 1
    assert 1.5 < time.monotonic() - start < 10
    assert "killing what is left" in proc.stderr.read()
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
