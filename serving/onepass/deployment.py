"""The one-pass deployment (gan, vae, flow): one replica serves one model version, batching images across
requests (serving.onepass.batcher) into forwards that run on a worker thread, off the event loop; and the
family's own operations (vae: interpolate, reconstruct; flow: log_likelihood) on the same thread.

A replica whose model fails to load stays up and answers every call with ModelUnavailable (serving.errors
says why); check_health is Serve's liveness probe: a batch-1 forward on the session, and the batching loop
alive."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial

import numpy as np
from ray import serve

from core.contracts import sample_inputs
from core.settings import SamplingSetting
from serving.api.jobs import (GenerationJob, GenerationResult, ImagesJob, InterpolationJob, LikelihoodResult,
                              ModelInfo, ReconstructionResult, ReplicaLoad)
from serving.config import ONE_PASS_GRAPH, OnePassConfig
from serving.errors import ModelUnavailable, unless_unavailable
from serving.observability import record_batch, record_request_times, report_model_ready
from serving.onepass.batcher import BatcherStats, ImageBatcher
from serving.onepass.inputs import draw_inputs, to_images
from serving.operations import (FAMILY_OPERATIONS, OPERATION_GRAPHS, dequantize, lerp, reconstruction_mse, slerp,
                                to_unit)
from serving.runtime import load_model, node_address, replica_cpus, threads_for

logger = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 1}, user_config=asdict(OnePassConfig()),
                  max_ongoing_requests=256, max_queued_requests=64)  # as deploy/serve_config.yaml says, and why
class OnePassDeployment:
    def __init__(self, store: str | None, ref: str):
        """Runs once per replica: load ref from the store (hashes verified) and open its sampling graph, and
        the graphs of its family's operations (vae.encode, flow.log_prob). If that fails, the replica comes
        up anyway, without a model: every call answers ModelUnavailable (load_error) with the reason."""
        name = ref.partition("@")[0]
        self.node = node_address()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"genserve-{name}")
        self.batcher = ImageBatcher(self._forward, on_job_done=partial(record_request_times, name))
        self._ready_task: asyncio.Task | None = None
        self.load_error: ModelUnavailable | None = None
        try:
            self.model = load_model(store, ref, ONE_PASS_GRAPH, threads=threads_for(replica_cpus()),
                                    extra_graphs=OPERATION_GRAPHS)
        except Exception as exc:
            self.load_error = ModelUnavailable.of(name, exc)
            logger.exception("genserve: %s failed to load; serving no requests for it", ref)
            return
        self.graph = self.model.graph
        # flow.sample takes z already scaled by the sampling temperature (its contract); gan/vae have none
        self.temperature = float(self.model.manifest.sampling.default.temperature or 1.0)
        self._probe = sample_inputs(self.graph.contract, 1, np.random.default_rng(0))  # check_health's forward

    async def reconfigure(self, user_config: dict) -> None:
        """Runs at start and on every user_config change (serve deploy / serve.run with a new config)."""
        self.batcher.reconfigure(OnePassConfig.from_dict(user_config))
        self._report_ready()

    def _report_ready(self) -> None:
        if self._ready_task is None:  # Serve runs reconfigure at replica start (user_config is always set)
            name = self.load_error.model if self.load_error else self.model.name
            self._ready_task = asyncio.create_task(report_model_ready(name, self.load_error is None))

    async def check_health(self) -> None:
        """Serve's liveness probe (every health_check_period_s): raises, and Serve replaces the replica, if the
        session no longer answers a batch-1 forward or the batching loop died. A replica without a model
        passes: a restart cannot mend a tampered artifact, it would only fail again in a loop; it reports
        itself instead (ModelUnavailable from every call, genserve_model_ready 0)."""
        if self.load_error is not None:
            return
        if (error := self.batcher.loop_error) is not None:
            raise RuntimeError(f"the batching loop died: {error!r}")
        await asyncio.get_running_loop().run_in_executor(self._executor, self.graph.run, self._probe)

    async def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        record_batch(self.model.name, len(next(iter(feeds.values()))))
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.graph.run, feeds)

    async def _sample(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One request's graph outputs: through the image batcher (the request-level baseline overrides this)."""
        return await self.batcher.submit(feeds)

    @unless_unavailable
    async def generate(self, job: GenerationJob) -> GenerationResult:
        start = time.perf_counter()
        feeds = draw_inputs(self.graph.contract, job.class_ids or job.class_id, job.n, job.seeds or job.seed,
                            self.temperature)
        x = await self._sample(feeds)  # [n, 1, 28, 28]
        settings = SamplingSetting(temperature=self.temperature) if self.model.family == "flow" else SamplingSetting()
        return GenerationResult(to_images(self.graph.contract, x), self.model.name, self.model.version,
                                self.model.family, (time.perf_counter() - start) * 1000, settings, node=self.node)

    # ---- the family's own operations: each raises ValueError (HTTP 400) on a family without it ----

    @unless_unavailable
    async def interpolate(self, job: InterpolationJob) -> GenerationResult:
        """vae: job.frames images decoded along the latent path between two seeds' prior draws (slerp; the
        ends are the images those seeds generate with n = 1) or two images' posterior means (lerp)."""
        start = time.perf_counter()
        self._require("interpolate")
        if job.seeds is not None:
            a, b = (draw_inputs(self.graph.contract, job.class_id, 1, seed)["z"][0] for seed in job.seeds)
            path, walk = slerp(a, b, job.frames), ("seeds", "slerp")
        else:
            mu = await self._encode(job.images, job.class_id)  # [2, latent]
            path, walk = lerp(mu[0], mu[1], job.frames), ("images", "lerp")
        x = await self.batcher.submit({"z": path, "y": np.full(job.frames, job.class_id, np.int64)})
        return GenerationResult(to_images(self.graph.contract, x), self.model.name, self.model.version,
                                self.model.family, (time.perf_counter() - start) * 1000, SamplingSetting(),
                                node=self.node, walk=walk)

    @unless_unavailable
    async def reconstruct(self, job: ImagesJob) -> ReconstructionResult:
        """vae: decode(encode(x)) at the posterior mean, and its per-pixel MSE (the anomaly score)."""
        start = time.perf_counter()
        self._require("reconstruct")
        mu = await self._encode(job.images, job.class_id)
        x = await self.batcher.submit({"z": mu, "y": np.full(len(mu), job.class_id, np.int64)})  # [n, 1, 28, 28]
        return ReconstructionResult(to_images(self.graph.contract, x), reconstruction_mse(job.images, x),
                                    self.model.name, self.model.version, self.model.family,
                                    (time.perf_counter() - start) * 1000)

    @unless_unavailable
    async def log_likelihood(self, job: ImagesJob) -> LikelihoodResult:
        """flow: bits/dim of each image from flow.log_prob on the image dequantized with job.seed's noise."""
        start = time.perf_counter()
        self._require("likelihood")
        y = np.full(len(job.images), job.class_id, np.int64)
        bits = await self._run("log_prob", {"x": dequantize(job.images, job.seed), "y": y})
        return LikelihoodResult(bits.astype(np.float64), self.model.name, self.model.version, self.model.family,
                                (time.perf_counter() - start) * 1000)

    def _require(self, operation: str) -> None:
        if operation not in FAMILY_OPERATIONS.get(self.model.family, ()):
            can = [f for f, ops in FAMILY_OPERATIONS.items() if operation in ops]
            raise ValueError(f"{self.model.name} is a {self.model.family} model; {operation} needs a "
                             f"{' or '.join(can)} model")

    async def _encode(self, images: np.ndarray, class_id: int) -> np.ndarray:
        """vae.encode's posterior means [n, latent] of uint8 images [n, 28, 28]."""
        return await self._run("encode", {"x": to_unit(images), "y": np.full(len(images), class_id, np.int64)})

    async def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """An operation's graph (first output) on the forward thread, in chunks of at most max_batch_images
        rows: these forwards queue with the sampling batches instead of competing with them for the CPU."""
        session, loop = self.model.extra[graph], asyncio.get_running_loop()
        n, size = len(next(iter(feeds.values()))), self.batcher.config.max_batch_images
        chunks = [await loop.run_in_executor(self._executor, session.run, {k: v[i:i + size] for k, v in feeds.items()})
                  for i in range(0, n, size)]
        return np.concatenate(chunks)

    @unless_unavailable
    async def info(self) -> ModelInfo:
        return ModelInfo.describe(self.model.manifest, path="one-pass", provider=self.model.providers.providers[0],
                                  threads=self.model.threads, settings=asdict(self.batcher.config))

    async def stats(self) -> ReplicaLoad | ModelUnavailable:
        """The batcher's live load, for the ingress's admission (a few times a second): one forward in flight
        at a time, so a request is one step. A replica without a model answers why (returned, not raised: it
        is asked 5 times a second, and the answer is news only to readiness)."""
        if self.load_error is not None:
            return self.load_error
        running, queued = self.batcher.in_flight_images, self.batcher.queued_images
        return ReplicaLoad(running_units=running, running_requests=int(running > 0), running_steps=float(running > 0),
                           queued_units=queued, queued_requests=int(queued > 0), queued_steps=float(queued > 0),
                           budget=self.batcher.config.max_batch_images)

    @unless_unavailable
    async def metrics(self) -> BatcherStats:
        """The batcher's counters (batches, images, recent batch sizes), for tests and benchmarks."""
        return self.batcher.stats
