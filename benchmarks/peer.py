"""The peer a user would write instead of genserve: ONE Ray Serve deployment, HTTP straight in, Serve's own
@serve.batch over requests, an ONNX Runtime session on the same GAN graph from the same store, the same
noise and the same PNG answer (so both do the same work per request). Benchmark 4 measures genserve's
one-pass path against it.

Takes the OpenAI-shaped body the load generator sends ({"class_id" | "prompt", "n", "seed"}) and answers
{"data": [{"b64_json"}]}; nothing is validated, as in a quick hand-written service."""
from __future__ import annotations

import asyncio
import base64

import numpy as np
import onnxruntime as ort
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from model_store.store import ModelStore
from serving.api.png import encode_png


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
class PeerGAN:
    def __init__(self, store: str, ref: str = "gan@latest"):
        loaded = ModelStore.open(store).load(ref)
        self.contract = loaded.manifest.graph("generate")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # the replica's one CPU, as genserve's replica
        self.session = ort.InferenceSession(loaded.graph_bytes(self.contract.graph), options,
                                            providers=["CPUExecutionProvider"])
        self.z_dim = self.contract.inputs[0].shape[1]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def forward(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        z = np.concatenate([r[0] for r in requests])
        y = np.concatenate([r[1] for r in requests])
        x = await asyncio.to_thread(self.session.run, None, {"z": z, "y": y})
        return np.split(x[0], np.cumsum([len(r[0]) for r in requests])[:-1])

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":  # the load generator asks what is served before it starts
            return JSONResponse({"object": "list", "data": [{"id": "gan", "object": "model"}]})
        body = await request.json()
        n, seed = int(body.get("n", 1)), int(body.get("seed", 0))
        z = np.random.default_rng(seed).standard_normal((n, self.z_dim), dtype=np.float32)
        y = np.full(n, int(body.get("class_id", 10)), dtype=np.int64)
        x = await self.forward((z, y))
        images = np.rint((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)[:, 0]
        return JSONResponse({"data": [{"b64_json": base64.b64encode(encode_png(im)).decode()} for im in images]})


def build(args: dict) -> serve.Application:
    return PeerGAN.bind(args["store"], args.get("ref", "gan@latest"))
