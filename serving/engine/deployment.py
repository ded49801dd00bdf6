"""The iterative deployment (diffusion, pixelcnn): one replica serves one model version through the
step-batched engine beside it (serving.engine); every request is `engine.stream(request)`, and joins
and leaves the running batch at step boundaries; `generate_stream` hands its previews on as they are made. The engine (and torch, for the sampler maths) lives in
this replica only; the ingress never imports it.

A replica whose model fails to load stays up and answers every call with ModelUnavailable (serving.errors
says why); check_health is Serve's liveness probe: a batch-1 forward on the session, and the engine loop
alive."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict

import numpy as np
import torch
from ray import serve

from core.contracts import NUM_PIXELS, sample_inputs
from core.samplers.autoregressive import bits_per_dim
from core.settings import DPMPP_2M, SamplingSetting
from serving.api.jobs import (GenerationJob, GenerationPreview, GenerationResult, ImagesJob, LikelihoodResult, ModelInfo,
                              ReplicaLoad)
from serving.config import ITERATIVE_GRAPH, IterativeConfig
from serving.engine import (AsyncEngine, DiffusionRequest, DiffusionStepper, EngineCore, EngineMetrics, OnnxRunner,
                            PixelCNNRequest, PixelCNNStepper)
from serving.engine.autoscaling import ROW_DEMAND
from serving.errors import ModelUnavailable, unless_unavailable
from serving.observability import report_model_ready
from serving.observability.engine import StepTiming, export_engine_metrics
from serving.operations import OPERATION_GRAPHS
from serving.runtime import load_model, node_address, replica_cpus, threads_for

logger = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 1}, user_config=asdict(IterativeConfig()),
                  max_ongoing_requests=384, max_queued_requests=64)  # as deploy/serve_config.yaml says, and why
class IterativeDeployment:
    def __init__(self, store: str | None, ref: str):
        """Runs once per replica: load ref from the store (hashes verified), open its step graph, and start
        an engine over it (the loop itself starts with the first request). If the load fails, the replica
        comes up anyway, without a model: every call answers ModelUnavailable (load_error) with the reason."""
        self.node = node_address()
        self.config = IterativeConfig()
        self._loop: asyncio.Task | None = None
        self._export: asyncio.Future | None = None  # the metrics reporters, for the replica's life
        self.load_error: ModelUnavailable | None = None
        try:
            self.model = load_model(store, ref, ITERATIVE_GRAPH, extra_graphs=OPERATION_GRAPHS,
                                    threads=threads_for(replica_cpus()))
        except Exception as exc:
            self.load_error = ModelUnavailable.of(ref.partition("@")[0], exc)
            logger.exception("genserve: %s failed to load; serving no requests for it", ref)
            return
        runner = OnnxRunner(self.model.graph.session, self.model.graph.contract)
        stepper = DiffusionStepper(runner) if self.model.family == "diffusion" else PixelCNNStepper(runner)
        self.timing = StepTiming(stepper, self.model.name)  # each request's queue vs compute time
        self.engine = AsyncEngine(EngineCore(self.timing, max_rows=self.config.max_batch_rows,
                                             max_waiting_rows=self.config.max_waiting_rows))
        self._probe = sample_inputs(self.model.graph.contract, 1, np.random.default_rng(0))  # check_health's

    async def reconfigure(self, user_config: dict) -> None:
        self.config = IterativeConfig.from_dict(user_config)
        if self._export is not None:
            self.engine.core.set_limits(self.config.max_batch_rows, self.config.max_waiting_rows)
            return
        # Serve runs reconfigure at replica start (user_config is always set): start reporting
        if self.load_error is not None:
            self._export = asyncio.create_task(report_model_ready(self.load_error.model, False))
            return
        self.engine.core.set_limits(self.config.max_batch_rows, self.config.max_waiting_rows)
        self._export = asyncio.gather(export_engine_metrics(self.model.name, self.engine.core.metrics),
                                      report_model_ready(self.model.name, True))

    async def check_health(self) -> None:
        """Serve's liveness probe (every health_check_period_s): raises, and Serve replaces the replica, if the
        session no longer answers a batch-1 forward (beside the engine's thread: ONNX Runtime sessions take
        concurrent runs) or the engine loop died. A replica without a model passes: a restart cannot mend a
        tampered artifact, it would only fail again in a loop; it reports itself instead (ModelUnavailable
        from every call, genserve_model_ready 0)."""
        if self.load_error is not None:
            return
        if self._loop is not None and self._loop.done() and not self._loop.cancelled() and self._loop.exception():
            raise RuntimeError(f"the engine loop died: {self._loop.exception()!r}")
        await asyncio.to_thread(self.model.graph.run, self._probe)

    def _request(self, job: GenerationJob) -> tuple[DiffusionRequest | PixelCNNRequest, SamplingSetting]:
        """The engine request for a job, and the setting it runs at in full: the job's over the manifest's
        default (diffusion), the default temperature and guidance (PixelCNN)."""
        default = self.model.manifest.sampling.default
        deadline = time.monotonic() + job.timeout_s if job.timeout_s else None
        if self.model.family == "diffusion":
            s = job.setting.over(default)
            s = SamplingSetting(s.sampler or DPMPP_2M, s.steps or 20,
                                1.0 if s.guidance_scale is None else float(s.guidance_scale))
            return DiffusionRequest(class_id=job.class_id, seed=job.seed, n=job.n, deadline=deadline, sampler=s.sampler,
                                    steps=s.steps, guidance_scale=s.guidance_scale, class_ids=job.class_ids,
                                    seeds=job.seeds, previews=job.previews), s
        s = SamplingSetting(guidance_scale=1.0 if default.guidance_scale is None else float(default.guidance_scale),
                            temperature=float(default.temperature or 1.0))
        return PixelCNNRequest(class_id=job.class_id, seed=job.seed, n=job.n, deadline=deadline,
                               temperature=s.temperature, guidance_scale=s.guidance_scale, class_ids=job.class_ids,
                               seeds=job.seeds, previews=job.previews), s

    def _stream(self, request) -> AsyncIterator:
        """One request's engine outputs: it joins the engine's running batch."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self.engine.run())
        return self.timing.stream(self.engine, request)

    async def _sample(self, request):
        """One request's images (the request-level baseline overrides this)."""
        async with aclosing(self._stream(request)) as outputs:
            async for output in outputs:
                if output.finished:
                    return output.images

    @unless_unavailable
    async def generate(self, job: GenerationJob) -> GenerationResult:
        start = time.perf_counter()
        request, settings = self._request(job)
        images = await self._sample(request)  # uint8 [n, 1, 28, 28]
        return GenerationResult(images.numpy()[:, 0], self.model.name, self.model.version, self.model.family,
                                (time.perf_counter() - start) * 1000, settings, node=self.node)

    @unless_unavailable
    async def generate_stream(self, job: GenerationJob) -> AsyncIterator[GenerationPreview | GenerationResult]:
        """generate, streamed (the ingress calls it with handle.options(stream=True)): the job's previews as the
        engine makes them (job.previews of them, at evenly spaced steps), then its GenerationResult. When the
        caller stops reading (its client went away), the request leaves the engine's batch at the next step."""
        start = time.perf_counter()
        request, settings = self._request(job)
        steps = request.steps if isinstance(request, DiffusionRequest) else NUM_PIXELS
        m = self.model
        async with aclosing(self._stream(request)) as outputs:
            async for output in outputs:
                ms = (time.perf_counter() - start) * 1000
                if output.finished:
                    yield GenerationResult(output.images.numpy()[:, 0], m.name, m.version, m.family, ms, settings,
                                           node=self.node)
                else:
                    yield GenerationPreview(output.images.numpy()[:, 0], output.preview_index, output.step, steps,
                                            m.name, m.version, m.family, ms)

    @unless_unavailable
    async def log_likelihood(self, job: ImagesJob) -> LikelihoodResult:
        """pixelcnn: exact bits/dim of each image from ONE teacher-forced forward of the `logits` graph (the
        whole image in, every pixel's mixture parameters out, their log-probabilities at the image's levels
        in float64 here; the engine samples with `step`, one pixel per row),
        beside the engine rather than through its step loop, in chunks of max_batch_rows. ValueError (HTTP
        400) on diffusion, which has no likelihood."""
        start = time.perf_counter()
        if self.model.family != "pixelcnn":
            raise ValueError(f"{self.model.name} is a {self.model.family} model; likelihood needs a flow or "
                             "pixelcnn model")
        size, bits = self.config.max_batch_rows, []
        for i in range(0, len(job.images), size):
            images = job.images[i:i + size]
            feeds = {"x": images[:, None].astype(np.float32), "y": np.full(len(images), job.class_id, np.int64)}
            mixture = await asyncio.to_thread(self.model.extra["logits"].run, feeds)  # [n, 3K, 28, 28]
            bits.append(bits_per_dim(torch.from_numpy(mixture), torch.from_numpy(images)).numpy())
        return LikelihoodResult(np.concatenate(bits), self.model.name, self.model.version, self.model.family,
                                (time.perf_counter() - start) * 1000)

    @unless_unavailable
    async def info(self) -> ModelInfo:
        return ModelInfo.describe(self.model.manifest, path="iterative", provider=self.model.providers.providers[0],
                                  threads=self.model.threads, settings=asdict(self.config))

    async def stats(self) -> ReplicaLoad | ModelUnavailable:
        """The engine's live load, for the ingress's admission (a few times a second). A replica without a
        model answers why (returned, not raised: it is asked 5 times a second, and the answer is news only to
        readiness)."""
        if self.load_error is not None:
            return self.load_error
        m = self.engine.core.metrics
        return ReplicaLoad(running_units=m.rows, running_requests=m.running, running_steps=m.steps_in_flight,
                           queued_units=m.rows_queued, queued_requests=m.queue_length, queued_steps=m.steps_queued,
                           budget=m.max_rows or None)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (serving.engine.autoscaling): rows running and queued, in row
        budgets. Serve polls it every metrics_interval_s."""
        if self.load_error is not None:
            return {ROW_DEMAND: 0.0}
        m = self.engine.core.metrics
        return {ROW_DEMAND: (m.rows + m.rows_queued) / max(1, self.config.max_batch_rows)}

    @unless_unavailable
    async def metrics(self) -> EngineMetrics:
        """The engine's gauges and counters (serving.engine.metrics), for tests and benchmarks."""
        return self.engine.core.metrics

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.stop()
