"""Dynamic batching across requests by IMAGE count, for one-pass models.

Ray Serve's @serve.batch batches calls (one call = one slot), so a request for 40 images and one for 1
would count alike; here the budget is images. A request for n images is a job; a batch takes images
from the queued jobs in arrival order up to `max_batch_images`, splitting a job that does not fit (its
rest leads the next batch), so one large request spans several batches and several small ones share
one. A batch runs once the queue holds `max_batch_images` images, or `max_wait_ms` after its oldest
job arrived, whichever is first. One batch is in flight at a time: the forward already uses the
replica's cores, and requests arriving meanwhile make the next batch fuller.

Invariants: a forward returns exactly one output row per input row, in order (checked); an exception
in a batch reaches every job with images in it, and the loop goes on with the next batch; a job whose
waiter went away (cancelled) is skipped from then on.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from serving.config import OnePassConfig

# Called with each input's rows for the whole batch (name -> [B, ...]); returns the outputs [B, ...].
Forward = Callable[[dict[str, np.ndarray]], Awaitable[np.ndarray]]
# Called as a job's last images come back: seconds it queued before its first batch, then until its outputs.
JobTimes = Callable[[float, float], None]


class BatchShapeError(RuntimeError):
    """The forward broke the one-row-out-per-row-in invariant."""


@dataclass(eq=False)
class _Job:
    inputs: dict[str, np.ndarray]          # name -> [n, ...]
    n: int
    future: asyncio.Future[np.ndarray]     # the waiter's; done early if it was cancelled or failed
    arrival: float                         # loop.time() at submit: max_wait_ms counts from here
    started: float | None = None           # loop.time() when its first batch began
    taken: int = 0                         # images handed to batches so far
    finished: int = 0                      # images whose outputs came back
    out: np.ndarray | None = None          # [n, ...], allocated at the first output


@dataclass
class BatcherStats:
    batches: int = 0                       # forwards run (including failed ones)
    images: int = 0                        # images in them
    failed_batches: int = 0
    recent_batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=256))  # newest last


class ImageBatcher:
    """submit() from any number of tasks on one event loop; the batching loop is a task of that loop,
    started by the first submit()."""

    def __init__(self, forward: Forward, config: OnePassConfig | None = None, on_job_done: JobTimes | None = None):
        self._forward = forward
        self._on_job_done = on_job_done
        self.config = config or OnePassConfig()
        self.stats = BatcherStats()
        self._queue: deque[_Job] = deque()    # jobs with images not yet taken, in arrival order
        self._queued_images = 0               # images not yet taken, over the queue (incl. cancelled jobs)
        self._arrived = asyncio.Event()       # set on submit and reconfigure: the loop re-checks its trigger
        self._in_flight: list[_Job] = []      # jobs with images in the batch now running
        self._in_flight_images = 0
        self._task: asyncio.Task | None = None

    @property
    def queued_images(self) -> int:
        """Images waiting for a batch (the policy's view of this replica's load)."""
        return self._queued_images

    @property
    def in_flight_images(self) -> int:
        """Images in the forward now running."""
        return self._in_flight_images

    @property
    def loop_error(self) -> BaseException | None:
        """The batching loop's exception if it died (a batch's own failure goes to its jobs, so only a bug ends
        the loop); None while it runs or before it started."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def reconfigure(self, config: OnePassConfig) -> None:
        """Live: the next batch formed uses the new settings; the one in flight is not touched."""
        self.config = config
        self._arrived.set()

    async def submit(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One request's rows (every input with the same leading n >= 1) -> its n output rows, in order."""
        sizes = {name: len(a) for name, a in inputs.items()}
        if not sizes or len(set(sizes.values())) != 1 or min(sizes.values()) < 1:
            raise ValueError(f"inputs must share one leading size n >= 1, got {sizes}")
        loop = asyncio.get_running_loop()
        job = _Job(inputs, next(iter(sizes.values())), loop.create_future(), loop.time())
        self._queue.append(job)
        self._queued_images += job.n
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="genserve-onepass-batcher")
        return await job.future  # if this task is cancelled, so is the future, and the loop skips the job

    async def close(self) -> None:
        """Stop the loop; jobs still queued get CancelledError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in [*self._queue, *self._in_flight]:
            job.future.cancel()
        self._queue.clear()
        self._in_flight = []
        self._queued_images = 0

    # ---- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wait_for_batch()
            pieces = self._take()
            if pieces:
                await self._execute(pieces)

    async def _wait_for_batch(self) -> None:
        """Return when a batch should run: the queue holds max_batch_images, or its oldest job has
        waited max_wait_ms."""
        loop = asyncio.get_running_loop()
        while True:
            self._drop_dead_head()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self._queued_images >= self.config.max_batch_images:
                return
            remaining = self._queue[0].arrival + self.config.max_wait_ms / 1000 - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _drop_dead_head(self) -> None:
        while self._queue and self._queue[0].future.done():  # cancelled or failed: nobody wants the rest
            job = self._queue.popleft()
            self._queued_images -= job.n - job.taken

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to max_batch_images images from the head of the queue, as (job, start, stop) pieces."""
        pieces, room = [], self.config.max_batch_images
        while self._queue and room:
            job = self._queue[0]
            if job.future.done():
                self._drop_dead_head()
                continue
            k = min(room, job.n - job.taken)
            pieces.append((job, job.taken, job.taken + k))
            job.taken += k
            self._queued_images -= k
            room -= k
            if job.taken == job.n:
                self._queue.popleft()
        return pieces

    async def _execute(self, pieces: list[tuple[_Job, int, int]]) -> None:
        size = sum(stop - start for _, start, stop in pieces)
        self.stats.batches += 1
        self.stats.images += size
        self.stats.recent_batch_sizes.append(size)
        feeds = {name: np.concatenate([job.inputs[name][start:stop] for job, start, stop in pieces])
                 for name in pieces[0][0].inputs}  # name -> [size, ...]
        self._in_flight = [job for job, _, _ in pieces]
        self._in_flight_images = size
        loop = asyncio.get_running_loop()
        for job in self._in_flight:
            if job.started is None:
                job.started = loop.time()
        try:
            out = await self._forward(feeds)
            if len(out) != size:
                raise BatchShapeError(f"the forward returned {len(out)} rows for a batch of {size} images")
        except Exception as exc:  # every job in the batch fails with it; the loop carries on
            self.stats.failed_batches += 1
            for job, _, _ in pieces:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._in_flight, self._in_flight_images = [], 0
        offset = 0
        for job, start, stop in pieces:
            k = stop - start
            if not job.future.done():
                if job.out is None:
                    job.out = np.empty((job.n, *out.shape[1:]), dtype=out.dtype)
                job.out[start:stop] = out[offset:offset + k]
                job.finished += k
                if job.finished == job.n:
                    job.future.set_result(job.out)
                    if self._on_job_done is not None:
                        self._on_job_done(job.started - job.arrival, loop.time() - job.started)
            offset += k
