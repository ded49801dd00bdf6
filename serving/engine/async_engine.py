"""The asyncio face of an EngineCore, for a Ray Serve replica: `async for output in stream(request)` (or
`await submit(request)`) per client request, and `run()` as the replica's one engine-loop task. Steps run
on a dedicated worker thread, so forward passes never block the event loop and requests keep arriving
while a step runs."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing
from concurrent.futures import ThreadPoolExecutor

import torch

from serving.engine.engine import EngineCore
from serving.engine.request import Request, RequestOutput, Status
from serving.errors import EngineStopped


class AsyncEngine:
    def __init__(self, core: EngineCore):
        self.core = core
        self._outputs: dict[str, asyncio.Queue[RequestOutput]] = {}  # request_id -> its stream()'s outputs
        self._wake = asyncio.Event()  # set on submit: the loop sleeps on it while there is no work
        self._stopping = False
        self._ids = itertools.count()
        # one thread: steps are strictly sequential, and torch / ORT keep their own intra-op threads
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="genserve-engine")

    async def stream(self, request: Request, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Runs once per client request, on the event loop: yields its previews (status RUNNING, if the
        request asked for any) as the engine makes them, then its final output (FINISHED, images uint8
        [n, 1, 28, 28]). Raises RequestCancelled, DeadlineExceeded, RequestFailed or EngineStopped instead of a
        final output that has no images. If the consumer stops early (closes the stream, or its task is
        cancelled: the client went away), the request is aborted and leaves the batch at the next step."""
        if self._stopping:
            raise EngineStopped("the engine is stopping; not accepting requests")
        request_id = request_id or f"async-{next(self._ids)}"
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._outputs[request_id] = outputs  # before add: the request may end at the very next step
        added = ended = False
        try:
            self.core.add_request(request, request_id)
            added = True
            self._wake.set()
            while not ended:
                output = await outputs.get()
                ended = output.finished
                yield output if output.status is Status.RUNNING else _with_images(output)
        finally:
            self._outputs.pop(request_id, None)
            if added and not ended:
                self.core.abort_request(request_id)

    async def submit(self, request: Request, request_id: str | None = None) -> torch.Tensor:
        """The request's final images, uint8 [n, 1, 28, 28] (previews, if it asked for any, are skipped);
        raises as stream() does."""
        async with aclosing(self.stream(request, request_id)) as outputs:
            async for output in outputs:
                if output.finished:
                    return output.images
        raise AssertionError("unreachable: stream() ends with a finished output or raises")

    def cancel(self, request_id: str) -> None:
        """Cancel from anywhere on the event loop; its stream() raises RequestCancelled."""
        self.core.abort_request(request_id)

    async def run(self) -> None:
        """The engine loop: start once per replica (asyncio.create_task(engine.run())); returns after
        stop(). Sleeps while there is no work; streams still in the engine then get EngineStopped."""
        loop = asyncio.get_running_loop()
        try:
            while not self._stopping:
                if not self.core.has_work():
                    self._wake.clear()  # no await since has_work(): a submit cannot slip between
                    await self._wake.wait()
                    continue
                for output in await loop.run_in_executor(self._executor, self.core.step):
                    if (outputs := self._outputs.get(output.request_id)) is not None:
                        outputs.put_nowait(output)
        finally:
            stopped = EngineStopped("the engine loop stopped before the request finished")
            for request_id, outputs in self._outputs.items():
                outputs.put_nowait(RequestOutput(request_id, Status.FAILED, None, stopped))
            self._executor.shutdown(wait=False)

    def stop(self) -> None:
        """Ask run() to return after the step in progress."""
        self._stopping = True
        self._wake.set()


def _with_images(output: RequestOutput) -> RequestOutput:
    """A final output, or raise its error."""
    output.result()
    return output
