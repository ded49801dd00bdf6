"""Slow and idle clients cost a connection each, never another client's time: while clients send their
headers a byte at a time, trickle their bodies, hold hundreds of idle keep-alive connections and hang up
mid-generation (their slots in the step batch are freed), a normal client's requests keep their usual
latency. Bounded: a few hundred sockets for ~10 s, loopback only. On the session's app (tests/conftest.py).

Serve's proxy runs uvicorn, which has no header or body read timeout of its own: a slow client holds its
connection (and, while its body trickles in, an ingress request slot: max_ongoing_requests) for as long as
it keeps sending. Idle keep-alive connections close after http_options.keep_alive_timeout_s
(deploy/serve_config.yaml says why 90 s)."""
from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import replica_metrics

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's, not ours

IDLE_CONNECTIONS = 300
SLOW_HEADERS = SLOW_BODIES = 5
HANG_UPS = 6
BYTE_EVERY_S = 0.02
NORMAL = json.dumps({"model": "gan", "prompt": "coat", "seed": 1}).encode()


def request_bytes(body: bytes, path: str = "/v1/images/generations") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length (what Serve's proxy sends here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_slow_and_idle_clients_do_not_slow_a_normal_one(server):
    host, port = server["url"].removeprefix("http://").split(":")
    address = (host, int(port))

    def normal_latencies(count: int, until: threading.Event | None = None) -> list[float]:
        """A normal client: generations one after another on one keep-alive connection."""
        out = []
        with connect(address) as sock:
            while len(out) < count or (until is not None and not until.is_set()):
                start = time.perf_counter()
                sock.sendall(request_bytes(NORMAL))
                status, _ = read_response(sock)
                assert status == 200
                out.append(time.perf_counter() - start)
        return out

    normal_latencies(5)                          # warm
    idle_p50 = statistics.median(normal_latencies(20))

    # hundreds of idle keep-alive connections: each made one request and stays open
    idle = []
    for _ in range(IDLE_CONNECTIONS):
        sock = connect(address)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        idle.append(sock)
    assert all(read_response(sock)[0] == 200 for sock in idle)

    def slow_headers() -> int:
        with connect(address) as sock:
            raw = request_bytes(NORMAL)
            head_end = raw.index(b"\r\n\r\n") + 4
            for i in range(head_end):          # the request line and headers a byte at a time (~2 s)
                sock.sendall(raw[i:i + 1])
                time.sleep(BYTE_EVERY_S)
            sock.sendall(raw[head_end:])
            return read_response(sock)[0]

    def slow_body() -> int:
        with connect(address) as sock:
            raw = request_bytes(NORMAL)
            head_end = raw.index(b"\r\n\r\n") + 4
            sock.sendall(raw[:head_end])
            for i in range(head_end, len(raw)):  # the body a byte at a time (~1 s)
                sock.sendall(raw[i:i + 1])
                time.sleep(BYTE_EVERY_S)
            return read_response(sock)[0]

    before = replica_metrics("diffusion")
    hang_ups = []
    for seed in range(HANG_UPS):               # long generations whose clients will hang up mid-way
        sock = connect(address)
        sock.sendall(request_bytes(json.dumps({"model": "diffusion", "prompt": "bag", "seed": seed, "steps": 1000,
                                               "best_effort": True}).encode()))  # past the default SLO
        hang_ups.append(sock)

    done = threading.Event()
    with ThreadPoolExecutor(SLOW_HEADERS + SLOW_BODIES + 1) as pool:
        normal = pool.submit(normal_latencies, 10, done)
        try:
            slow = [pool.submit(slow_headers) for _ in range(SLOW_HEADERS)] + \
                   [pool.submit(slow_body) for _ in range(SLOW_BODIES)]
            deadline = time.monotonic() + 30
            while replica_metrics("diffusion")["running"] < HANG_UPS:   # all in the step batch: now hang up
                assert time.monotonic() < deadline, replica_metrics("diffusion")
                time.sleep(0.05)
            for sock in hang_ups:
                sock.close()
            slow_statuses = [f.result(timeout=60) for f in slow]
        finally:
            done.set()  # else a failure above leaves the normal client looping, and the pool never closes
        under_load = normal.result(timeout=60)

    assert slow_statuses == [200] * (SLOW_HEADERS + SLOW_BODIES)   # slow, but served
    p50 = statistics.median(under_load)
    assert p50 <= 3 * idle_p50 + 0.2, (idle_p50, p50, under_load)
    print(f"normal client p50: idle {idle_p50 * 1000:.0f} ms, beside slow and idle clients {p50 * 1000:.0f} ms "
          f"({len(under_load)} requests)")

    deadline = time.monotonic() + 20            # every hung-up generation left the batch, none finished
    while (now := replica_metrics("diffusion"))["cancelled"] - before["cancelled"] < HANG_UPS or now["running"]:
        assert time.monotonic() < deadline, (before, now)
        time.sleep(0.1)
    assert now["finished"] == before["finished"]

    for sock in idle[:10]:                      # idle connections stay usable (keep-alive), then close
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0] == 200
    for sock in idle:
        sock.close()
