"""The asyncio face of an EngineCore, for a Ray Serve replica: `await submit(request)` per client request,
and `run()` as the replica's one engine-loop task. Steps run on a dedicated worker thread, so forward
passes never block the event loop and requests keep arriving while a step runs."""

from __future__ import annotations

import asyncio
import itertools
from concurrent.futures import ThreadPoolExecutor

import torch

from serving.engine.engine import EngineCore
from serving.engine.request import Request, RequestOutput
from serving.errors import EngineStopped


class AsyncEngine:
    def __init__(self, core: EngineCore):
        self.core = core
        self._waiters: dict[str, asyncio.Future[RequestOutput]] = {}  # request_id -> its submit()'s future
        self._wake = asyncio.Event()  # set on submit: the loop sleeps on it while there is no work
        self._stopping = False
        self._ids = itertools.count()
        # one thread: steps are strictly sequential, and torch / ORT keep their own intra-op threads
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="genserve-engine")

    async def submit(self, request: Request, request_id: str | None = None) -> torch.Tensor:
        """Runs once per client request, on the event loop: returns its images, uint8 [n, 1, 28, 28].
        Raises RequestCancelled, DeadlineExceeded or RequestFailed. If the awaiting task is cancelled
        (the client went away), the request is aborted and leaves the batch at the next step."""
        if self._stopping:
            raise EngineStopped("the engine is stopping; not accepting requests")
        request_id = request_id or f"async-{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = future  # before add: the request may end at the very next step
        try:
            self.core.add_request(request, request_id)
            self._wake.set()
            return (await future).result()
        except asyncio.CancelledError:
            self.core.abort_request(request_id)
            raise
        finally:
            self._waiters.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        """Cancel from anywhere on the event loop; its submit() raises RequestCancelled."""
        self.core.abort_request(request_id)

    async def run(self) -> None:
        """The engine loop: start once per replica (asyncio.create_task(engine.run())); returns after
        stop(). Sleeps while there is no work; waiters still in the engine then get EngineStopped."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                if not self.core.has_work():
                    self._wake.clear()  # no await since has_work(): a submit cannot slip between
                    await self._wake.wait()
                    continue
                for output in await loop.run_in_executor(self._executor, self.core.step):
                    future = self._waiters.get(output.request_id)
                    if future is not None and not future.done():
                        future.set_result(output)
        finally:
            for future in self._waiters.values():
                if not future.done():
                    future.set_exception(EngineStopped("the engine loop stopped before the request finished"))
            self._executor.shutdown(wait=False)

    def stop(self) -> None:
        """Ask run() to return after the step in progress."""
        self._stopping = True
        self._wake.set()
