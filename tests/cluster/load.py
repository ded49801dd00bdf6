"""An open-loop load for the fault tests, in a background thread, so the test can kill a node while it runs.

`genserve loadtest` (loadtests/) is the load the serving test drives; a fault test needs what its records do
not keep: each request's send and finish time on this process's clock (to line them up with the moment of
the fault), the error body's shape (a clean OpenAI error or not), the X-Genserve-Node header and the served
model version. Like loadtests' runner it sends every request at its scheduled time in its own task, however
many are still waiting (no coordinated omission), and bounds each by a deadline.
"""
from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.cluster.harness import NODE_HEADER, percentile


@dataclass
class Sent:
    id: int
    url: str
    model: str
    t_send: float                    # time.monotonic() when it was sent
    t_done: float                    # ... and when its answer was read (or it failed, or hit the deadline)
    status: int                      # 0: no HTTP answer (connection error; `timeout` says if the deadline hit)
    ok: bool                         # 200 with the images asked for
    clean: bool                      # a failure in OpenAI's error shape: 4xx/5xx + {"error": {"message"}}
    timeout: bool = False            # no answer within the deadline
    message: str | None = None
    node: str | None = None          # X-Genserve-Node (or the body's `node`)
    version: str | None = None       # the model version that served it
    image: bytes | None = None       # the first image's PNG bytes (kept when keep_images)

    @property
    def seconds(self) -> float:
        return self.t_done - self.t_send


@dataclass
class OpenLoad:
    """`rate` requests/s for `duration_s`, evenly spaced, cycling through `templates` (OpenAI request bodies)
    and `urls` (the proxies, round-robin, as a load balancer in front of the nodes would); request i gets
    seed `seed + i` unless its template fixes one. Each request is abandoned at `deadline_s`."""

    urls: list[str]
    templates: list[dict[str, Any]]
    rate: float
    duration_s: float
    deadline_s: float = 30.0
    seed: int = 0
    keep_images: bool = False
    records: list[Sent] = field(default_factory=list)
    t0: float = 0.0
    _stopped: bool = False

    def start(self) -> OpenLoad:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="open-load", daemon=True)
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Send nothing more (what was sent still finishes); join() then returns sooner."""
        self._stopped = True

    def join(self) -> list[Sent]:
        """Wait for every request to finish; at most duration + deadline + slack."""
        self._thread.join(self.duration_s + self.deadline_s + 30)
        if self._thread.is_alive():
            raise RuntimeError("the load generator did not finish within duration + deadline + 30 s")
        return sorted(self.records, key=lambda s: s.id)

    async def _main(self) -> None:
        n = int(self.rate * self.duration_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False),
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            tasks = []
            for i in range(n):
                at = self.t0 + i / self.rate
                if (delay := at - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                if self._stopped:
                    break
                tasks.append(asyncio.create_task(self._one(session, i)))
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, i: int) -> Sent:
        url = self.urls[i % len(self.urls)]
        body = {"seed": self.seed + i} | self.templates[i % len(self.templates)]
        t_send = time.monotonic()
        status, payload, headers, timeout, message = 0, None, {}, False, None
        try:
            async with asyncio.timeout(self.deadline_s):
                async with session.post(url.rstrip("/") + "/v1/images/generations", json=body) as r:
                    status, headers, raw = r.status, r.headers, await r.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                message = f"not JSON: {raw[:200]!r}"
        except TimeoutError:
            timeout, message = True, f"no answer within {self.deadline_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            message = f"{type(exc).__name__}: {exc}"
        t_done = time.monotonic()
        ok = status == 200 and isinstance(payload, dict) and len(payload.get("data") or []) == body.get("n", 1)
        clean = (400 <= status < 600 and isinstance(payload, dict) and isinstance(payload.get("error"), dict)
                 and isinstance(payload["error"].get("message"), str) and payload["error"]["message"] != "")
        if not ok and message is None:
            message = (payload["error"]["message"] if clean else f"HTTP {status}: {str(payload)[:200]}")
        node = headers.get(NODE_HEADER) or (payload.get("node") if isinstance(payload, dict) else None)
        image = (base64.b64decode(payload["data"][0]["b64_json"]) if ok and self.keep_images else None)
        sent = Sent(i, url, body["model"], t_send, t_done, status, ok, clean, timeout, message, node,
                    payload.get("version") if ok else None, image)
        self.records.append(sent)
        return sent


@dataclass
class ClosedLoad(OpenLoad):
    """`concurrency` users for `duration_s`, each sending its next request (cycling through templates, urls
    alternating between users) as soon as its last one is answered: the demand on the server is the same
    whatever its speed, where an open loop's depends on how fast the machine serves. `rate` is unused (0)."""

    concurrency: int = 2

    async def _main(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            counter = iter(range(10**9))

            async def user() -> None:
                while time.monotonic() < self.t0 + self.duration_s and not self._stopped:
                    if not (await self._one(session, next(counter))).ok:
                        await asyncio.sleep(0.5)   # a refused or failed request: do not spin

            await asyncio.gather(*(user() for _ in range(self.concurrency)))


def summarize(records: list[Sent], since: float | None = None, until: float | None = None) -> dict[str, Any]:
    """Counts and latency of the requests sent in [since, until) (monotonic times; None: unbounded)."""
    rs = [r for r in records if (since is None or r.t_send >= since) and (until is None or r.t_send < until)]
    ok = [r for r in rs if r.ok]
    ms = [r.seconds * 1000 for r in ok]
    return {"requests": len(rs), "ok": len(ok), "failed": len(rs) - len(ok),
            "failed_fraction": round((len(rs) - len(ok)) / len(rs), 4) if rs else None,
            "timeouts": sum(r.timeout for r in rs), "unclean_failures": sum(not r.ok and not r.clean for r in rs),
            "p50_ms": _round(percentile(ms, 0.5)), "p95_ms": _round(percentile(ms, 0.95)),
            "max_ms": _round(max(ms) if ms else None)}


def in_flight(records: list[Sent], at: float) -> list[Sent]:
    """The requests sent before `at` and not finished by then."""
    return [r for r in records if r.t_send <= at < r.t_done]


def failures(records: list[Sent], t0: float = 0.0, limit: int = 10) -> list[str]:
    """The first failures, readable: id, model, proxy, send time after t0, status and message."""
    return [f"#{r.id} {r.model} via {r.url} at +{r.t_send - t0:.2f} s ({r.seconds:.2f} s): {r.status} {r.message}"
            for r in records if not r.ok][:limit]


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
