"""The judge deployment: the classifier's `classify` graph (ONNX Runtime), scoring images for the cascade
(serving/api/cascade.py). Images from concurrent requests share forwards through the one-pass path's
image batcher (serving.onepass.batcher), so a burst of judgements costs a few batched forwards.

It generates nothing: it is not in the ingress's models (/v1/models, `auto`, the APIs' model names), only
the cascade calls it. A replica whose judge fails to load stays up and answers ModelUnavailable, like the
model replicas."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
from ray import serve

from core.contracts import sample_inputs
from serving.config import OnePassConfig
from serving.errors import ModelUnavailable, unless_unavailable
from serving.judge import JUDGE, ScoreJob, confidence
from serving.onepass.batcher import ImageBatcher
from serving.runtime import load_model, replica_cpus, threads_for

logger = logging.getLogger("ray.serve")
GRAPH = {"classifier": "classify"}   # family -> the graph it serves


# The judge's forward is small (~5 ms for 64 images on one thread): a fraction of a CPU serves it
@serve.deployment(ray_actor_options={"num_cpus": 0}, user_config=asdict(OnePassConfig()),
                  max_ongoing_requests=256, max_queued_requests=64)
class JudgeDeployment:
    def __init__(self, store: str | None, ref: str):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="genserve-judge")
        self.batcher = ImageBatcher(self._forward)
        self.load_error: ModelUnavailable | None = None
        try:
            self.model = load_model(store, ref, GRAPH, threads=threads_for(replica_cpus()))
        except Exception as exc:
            self.load_error = ModelUnavailable.of(JUDGE, exc)
            logger.exception("genserve: the judge %s failed to load; cascades will deliver stage 1", ref)
            return
        self._probe = sample_inputs(self.model.graph.contract, 1, np.random.default_rng(0))

    async def reconfigure(self, user_config: dict) -> None:
        self.batcher.reconfigure(OnePassConfig.from_dict(user_config))

    async def check_health(self) -> None:
        """Serve's liveness probe: a batch-1 forward, and the batching loop alive."""
        if self.load_error is not None:
            return
        if (error := self.batcher.loop_error) is not None:
            raise RuntimeError(f"the batching loop died: {error!r}")
        await asyncio.get_running_loop().run_in_executor(self._executor, self.model.graph.run, self._probe)

    async def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.model.graph.run, feeds)

    @unless_unavailable
    async def score(self, job: ScoreJob) -> np.ndarray:
        """float [n]: each image's confidence in its class (serving.judge.confidence)."""
        x = job.images[:, None].astype(np.float32) / np.float32(255.0)  # [n, 1, 28, 28] in [0, 1]
        logits = await self.batcher.submit({"x": x})                    # [n, 10]
        return confidence(logits, np.asarray(job.class_ids, np.int64))

    @unless_unavailable
    async def latency(self) -> dict[int, float]:
        """The manifest's ms per forward by batch size (the cascade plans the judge's time with it)."""
        return self.model.manifest.latency.ms_per_forward[GRAPH["classifier"]]
