"""The minimal step-batched diffusion loop a user could write instead of genserve: the peer of the `machine`
benchmark (benchmarks/serving.py). ONE Ray Serve deployment, HTTP straight in, one asyncio task that runs the
UNet once per DDIM step over the rows of every running request; requests join and leave the batch at every
step. Unguided DDIM (eta 0) from the same store's graph, the same PNG answer; nothing validated, no admission,
no deadlines, as in a quick hand-written service. `threads` is ONNX Runtime's intra-op thread count.

Takes the OpenAI-shaped body the load generator sends ({"class_id", "n", "seed", "steps"}), answers
{"data": [{"b64_json"}]}."""
from __future__ import annotations

import asyncio
import base64

import numpy as np
import onnxruntime as ort
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from core.samplers.schedule import inference_timesteps, linear_alphas_cumprod
from model_store.store import ModelStore
from serving.api.png import encode_png


class _Job:
    def __init__(self, x: np.ndarray, y: np.ndarray, steps: int):
        self.x, self.y, self.timesteps, self.k = x, y, inference_timesteps(steps), 0
        self.done = asyncio.get_running_loop().create_future()


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=1000)
class StepLoop:
    def __init__(self, store: str, threads: int = 2, max_rows: int = 64, ref: str = "diffusion@latest"):
        loaded = ModelStore.open(store).load(ref)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(loaded.graph_bytes(loaded.manifest.graph("denoise").graph), options,
                                            providers=["CPUExecutionProvider"])
        self.alphas = np.append(linear_alphas_cumprod().double().numpy(), 1.0)  # [-1]: after the last step
        self.max_rows, self.waiting, self.running = max_rows, [], []
        self.wake, self.task = asyncio.Event(), None

    async def _loop(self) -> None:
        while True:
            while self.waiting and sum(len(j.x) for j in self.running) + len(self.waiting[0].x) <= self.max_rows:
                self.running.append(self.waiting.pop(0))  # join at a step boundary
            if not self.running:
                self.wake.clear()
                await self.wake.wait()
                continue
            jobs = self.running
            x, y = np.concatenate([j.x for j in jobs]), np.concatenate([j.y for j in jobs])
            t = np.concatenate([np.full(len(j.x), j.timesteps[j.k]) for j in jobs])
            t_prev = np.concatenate([np.full(len(j.x), (j.timesteps + [-1])[j.k + 1]) for j in jobs])
            eps = (await asyncio.to_thread(self.session.run, None, {"x": x, "t": t, "y": y}))[0]
            a, a_prev = self.alphas[t][:, None, None, None], self.alphas[t_prev][:, None, None, None]
            x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
            eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
            x = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps).astype(np.float32)
            for j, part in zip(jobs, np.split(x, np.cumsum([len(j.x) for j in jobs])[:-1])):
                j.x, j.k = part, j.k + 1
                if j.k == len(j.timesteps):  # leave the batch at once
                    j.done.set_result(part)
            self.running = [j for j in jobs if not j.done.done()]

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":  # the load generator asks what is served before it starts
            return JSONResponse({"object": "list", "data": [{"id": "diffusion", "object": "model"}]})
        body = await request.json()
        n, seed = int(body.get("n", 1)), int(body.get("seed", 0))
        x = np.random.default_rng(seed).standard_normal((n, 1, 28, 28), dtype=np.float32)
        job = _Job(x, np.full(n, int(body.get("class_id", 10)), np.int64), int(body.get("steps", 20)))
        self.waiting.append(job)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.wake.set()
        images = np.rint((np.clip(await job.done, -1, 1) + 1) * 127.5).astype(np.uint8)[:, 0]
        return JSONResponse({"data": [{"b64_json": base64.b64encode(encode_png(im)).decode()} for im in images]})


def build(args: dict) -> serve.Application:
    return StepLoop.bind(args["store"], int(args.get("threads", 2)))
