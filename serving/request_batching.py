"""The request-level batching baseline: the same models served with plain Ray Serve `@serve.batch` over
whole requests, as a user would write it. Selected with `batching: request` in the Serve config's
application args (with `admission: false`, for a baseline without genserve's admission control too);
genserve's own paths (`batching: step`, the default) are what it is measured against.

- one-pass: a batch of up to `max_batch_images` REQUESTS (Serve counts calls, not images), waiting up to
  `max_wait_ms` for them, runs one forward over all their images.
- iterative: a batch of up to max_batch_rows // 2 requests (a guided image takes two rows) runs to
  completion together: no request joins a running batch, and every request in it returns when the
  longest finishes. Each step is the same engine step (EngineCore over the same stepper), so the two
  paths differ only in when requests may join and leave.

Both read the user_config of the path they replace, so switching is one line in the config file."""
from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from serving.config import IterativeConfig, OnePassConfig
from serving.engine.deployment import IterativeDeployment
from serving.onepass.deployment import OnePassDeployment

# How long an iterative batch waits for more requests: a few ms, like the one-pass default, is small next to
# a diffusion request's hundreds of ms
ITERATIVE_WAIT_S = 0.01


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256, max_queued_requests=64)
class RequestBatchedOnePass(OnePassDeployment.func_or_class):
    async def reconfigure(self, user_config: dict) -> None:
        config = OnePassConfig.from_dict(user_config)
        self.batcher.config = config  # what info() reports; the image batcher itself goes unused here
        self._forward_requests.set_max_batch_size(config.max_batch_images)
        self._forward_requests.set_batch_wait_timeout_s(config.max_wait_ms / 1000)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _forward_requests(self, requests: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Every request's rows in one forward, the outputs split back per request."""
        sizes = [len(next(iter(feeds.values()))) for feeds in requests]
        feeds = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
        out = await self._forward(feeds)
        return np.split(out, np.cumsum(sizes)[:-1])

    async def _sample(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return await self._forward_requests(feeds)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=384, max_queued_requests=64)
class RequestBatchedIterative(IterativeDeployment.func_or_class):
    async def reconfigure(self, user_config: dict) -> None:
        self.config = IterativeConfig.from_dict(user_config)
        self._run_requests.set_max_batch_size(max(1, self.config.max_batch_rows // 2))

    def _run_to_completion(self, requests: list) -> list:
        """Off the event loop: one fresh engine core over this batch only, stepped until all have left."""
        from serving.engine import EngineCore

        core = EngineCore(self.engine.core.stepper, max_rows=sum(r.rows for r in requests))
        ids = [core.add_request(r) for r in requests]
        outputs = {}
        while core.has_work():
            outputs.update((o.request_id, o) for o in core.step())
        return [outputs[i] for i in ids]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=ITERATIVE_WAIT_S)
    async def _run_requests(self, requests: list) -> list:
        # off the event loop; one batch at a time (@serve.batch's max_concurrent_batches=1)
        return await asyncio.get_running_loop().run_in_executor(None, self._run_to_completion, requests)

    async def _sample(self, request):
        output = await self._run_requests(request)
        return output.result()  # raises DeadlineExceeded / RequestFailed like the engine path
