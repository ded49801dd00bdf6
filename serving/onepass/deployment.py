"""The one-pass deployment (gan, vae, flow): one replica serves one model version, batching images across
requests (serving.onepass.batcher) into forwards that run on a worker thread, off the event loop."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import ray
from ray import serve

from serving.api.jobs import GenerationJob, GenerationResult, ModelInfo
from serving.config import ONE_PASS_GRAPH, OnePassConfig
from serving.onepass.batcher import ImageBatcher
from serving.onepass.inputs import draw_inputs, to_images
from serving.runtime import load_model, threads_for


def replica_cpus() -> float | None:
    """CPUs Ray granted this replica (ray_actor_options.num_cpus)."""
    return ray.get_runtime_context().get_assigned_resources().get("CPU")


@serve.deployment(ray_actor_options={"num_cpus": 1}, user_config=asdict(OnePassConfig()),
                  max_ongoing_requests=256)  # requests wait in the batcher's queue, which batches them
class OnePassDeployment:
    def __init__(self, store: str | None, ref: str):
        """Runs once per replica: load ref from the store (hashes verified) and open its sampling graph."""
        self.model = load_model(store, ref, ONE_PASS_GRAPH, threads=threads_for(replica_cpus()))
        self.graph = self.model.graph
        # flow.sample takes z already scaled by the sampling temperature (its contract); gan/vae have none
        self.temperature = float(self.model.manifest.sampling.default.get("temperature", 1.0))
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"genserve-{self.model.name}")
        self.batcher = ImageBatcher(self._forward)

    async def reconfigure(self, user_config: dict) -> None:
        """Runs at start and on every user_config change (serve deploy / serve.run with a new config)."""
        self.batcher.reconfigure(OnePassConfig.from_dict(user_config))

    async def _forward(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.graph.run, feeds)

    async def generate(self, job: GenerationJob) -> GenerationResult:
        start = time.perf_counter()
        feeds = draw_inputs(self.graph.contract, job.class_id, job.n, job.seed, self.temperature)
        x = await self.batcher.submit(feeds)  # [n, 1, 28, 28]
        settings = {"temperature": self.temperature} if self.model.family == "flow" else {}
        return GenerationResult(to_images(self.graph.contract, x), self.model.name, self.model.version,
                                self.model.family, (time.perf_counter() - start) * 1000, settings)

    async def info(self) -> ModelInfo:
        m = self.model.manifest
        return ModelInfo(m.model, m.version, m.family, m.created_at, "one-pass", self.model.providers.providers[0],
                         self.model.threads, asdict(self.batcher.config))

    async def stats(self) -> dict:
        s = self.batcher.stats
        return {"batches": s.batches, "images": s.images, "failed_batches": s.failed_batches,
                "recent_batch_sizes": list(s.recent_batch_sizes)}
