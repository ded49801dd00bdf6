"""A real S3-compatible server for tests: moto in server mode (`python -m moto.server`), as a separate
process speaking HTTP, so the code under test goes through s3fs/botocore exactly as against real S3.

Reusable outside pytest (the multi-host harness in tests/cluster/ starts it inside a Linux network
namespace with `netns=`):

    proc, endpoint = start_moto_server("127.0.0.1", free_local_port())
    ...  # AWS_ENDPOINT_URL=endpoint, any AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (moto accepts all)
    stop_moto_server(proc)

The server's stderr (werkzeug's access log: one line per request, e.g. `"GET /bucket/key HTTP/1.1" 200`)
goes to a file, `proc.log_path`, never to a pipe nobody reads (a full pipe would stall the server);
`request_log(proc)` returns it, so a test can count the requests the server really saw."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PROBE = ("import sys, urllib.request\n"
          "try:\n"
          "    urllib.request.urlopen(sys.argv[1], timeout=2).read()\n"
          "except Exception as exc:\n"
          "    sys.exit(f'{type(exc).__name__}: {exc}')\n")


def free_local_port(host: str = "127.0.0.1") -> int:
    """A port that is free on host right now (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _probe(url: str, netns: str | None) -> str | None:
    """None when the server answers an HTTP request at url, else why not. Inside a namespace the probe
    runs there too (`ip netns exec`), since the caller's namespace may have no route to it."""
    if netns is None:
        import urllib.request
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return None
        except Exception as exc:  # noqa: BLE001 - any failure means "not up yet"
            return f"{type(exc).__name__}: {exc}"
    done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", _PROBE, url],
                          capture_output=True, text=True, timeout=30)
    return None if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def start_moto_server(host: str, port: int, *, netns: str | None = None, timeout_s: float = 30.0,
                      log_path: str | os.PathLike | None = None) -> tuple[subprocess.Popen, str]:
    """Start moto's S3-compatible server bound to host:port (inside network namespace `netns` when given,
    via `ip netns exec`, which needs root) and wait until it answers HTTP. Returns (process, endpoint_url),
    e.g. (proc, "http://127.0.0.1:41234"). The process's stderr/stdout go to proc.log_path. Raises
    RuntimeError carrying that log when the server exits or does not answer within timeout_s."""
    cmd = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    if netns is not None:
        if shutil.which("ip") is None:
            raise RuntimeError("start_moto_server(netns=...) needs the `ip` command (iproute2)")
        cmd = ["ip", "netns", "exec", netns, *cmd]
    endpoint = f"http://{_url_host(host)}:{port}"
    # Something already answering there would pass the readiness probe below while our server dies on
    # "address in use": refuse up front.
    if _probe(f"{endpoint}/moto-api/", netns) is None:
        raise RuntimeError(f"cannot start a moto server at {endpoint}: something already answers there "
                           f"(port {port} is taken)")
    own_log = log_path is None
    if own_log:
        fd, log_path = tempfile.mkstemp(prefix=f"moto-{port}-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    proc.log_path = log_path  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout_s
    why = "not probed"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log_path.read_text(errors="replace")[-4000:]
            if own_log:
                log_path.unlink(missing_ok=True)
            raise RuntimeError(f"moto server ({' '.join(cmd)}) exited with {proc.returncode} before answering:\n"
                               f"{output}")
        why = _probe(f"{endpoint}/moto-api/", netns)
        if why is None:
            return proc, endpoint
        time.sleep(0.1)
    stop_moto_server(proc)
    output = log_path.read_text(errors="replace")[-4000:]
    if own_log:
        log_path.unlink(missing_ok=True)
    raise RuntimeError(f"moto server ({' '.join(cmd)}) did not answer at {endpoint} within {timeout_s:.0f} s "
                       f"(last probe: {why}); its output:\n{output}")


def stop_moto_server(proc: subprocess.Popen, timeout_s: float = 10.0, *, remove_log: bool = False) -> None:
    """Terminate the server started by start_moto_server (this process only), then kill it if it lingers;
    remove_log: delete its log file too."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
    if remove_log:
        Path(proc.log_path).unlink(missing_ok=True)  # type: ignore[attr-defined]


def request_log(proc: subprocess.Popen) -> str:
    """Everything the server has logged so far: one access-log line per request it served."""
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


if __name__ == "__main__":  # manual use: python -m tests.s3server [HOST] [PORT]
    h = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    p = int(sys.argv[2]) if len(sys.argv) > 2 else free_local_port(h)
    server, url = start_moto_server(h, p)
    print(f"moto S3 at {url} (pid {server.pid}, log {server.log_path}); Ctrl-C stops", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        stop_moto_server(server)
