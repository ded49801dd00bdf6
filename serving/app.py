"""The genserve Ray Serve application, built from ONE Serve config file (deploy/serve_config.yaml):

    applications[genserve].import_path = serving.app:build_app   # this module's app builder
    applications[genserve].args        = AppArgs: store, models, ingress_timeout_s, batching
    applications[genserve].deployments = Ingress + one per model, named after it, with user_config

`serve run deploy/serve_config.yaml`, `serve deploy deploy/serve_config.yaml`, `genserve up` and KubeRay's
serveConfigV2 all read that file. build_app looks each model up in the store once, to pick its path by
family: one-pass (gan, vae, flow) or iterative (diffusion, pixelcnn); each replica then loads its version
with every hash verified.
"""
from __future__ import annotations

import asyncio
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import yaml
from ray import serve
from ray.serve import Application

from model_store.errors import StoreError
from model_store.store import ModelStore
from serving.api.ingress import Ingress
from serving.api.jobs import GenerationJob, GenerationResult, ImagesJob, LikelihoodResult, ModelInfo
from serving.config import DEFAULT_CONFIG, ITERATIVE_GRAPH, ONE_PASS_GRAPH, AppArgs, IterativeConfig
from serving.observability import METRICS_PORT
from serving.observability.engine import StepTiming, export_engine_metrics
from serving.onepass.deployment import OnePassDeployment, replica_cpus
from serving.operations import pixelcnn_bits_per_dim
from serving.runtime import load_model, threads_for

INGRESS = "Ingress"   # the ingress deployment's name in the config


@serve.deployment(ray_actor_options={"num_cpus": 1}, user_config=asdict(IterativeConfig()), max_ongoing_requests=256)
class IterativeDeployment:
    """diffusion / pixelcnn: a replica runs serving.engine's step-batched loop over one model version; every
    request is `await engine.submit(request)`. The engine (and torch, which it uses for the sampler maths)
    is imported here, in this replica only."""

    def __init__(self, store: str | None, ref: str):
        from serving.engine import AsyncEngine, DiffusionStepper, EngineCore, OnnxRunner, PixelCNNStepper

        self.model = load_model(store, ref, ITERATIVE_GRAPH, threads=threads_for(replica_cpus()))
        runner = OnnxRunner(self.model.graph.session, self.model.graph.contract)
        stepper = DiffusionStepper(runner) if self.model.family == "diffusion" else PixelCNNStepper(runner)
        self.timing = StepTiming(stepper, self.model.name)  # each request's queue vs compute time
        self.config = IterativeConfig()
        self.engine = AsyncEngine(EngineCore(self.timing, max_rows=self.config.max_batch_rows))
        self._loop: asyncio.Task | None = None
        self._export: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict) -> None:
        self.config = IterativeConfig.from_dict(user_config)
        self.engine.core.set_max_rows(self.config.max_batch_rows)
        if self._export is None:  # Serve runs reconfigure at replica start (user_config is always set)
            self._export = asyncio.create_task(export_engine_metrics(self.model.name, self.engine.core.metrics))

    def _request(self, job: GenerationJob):
        from serving.engine import DiffusionRequest, PixelCNNRequest

        default = self.model.manifest.sampling.default
        deadline = time.monotonic() + job.timeout_s if job.timeout_s else None
        if self.model.family == "diffusion":
            settings = {"sampler": job.sampler or default.get("sampler", "dpmpp_2m"),
                        "steps": job.steps or int(default.get("steps", 20)),
                        "guidance_scale": float(default.get("guidance_scale", 1.0) if job.guidance_scale is None
                                                else job.guidance_scale)}
            return DiffusionRequest(class_id=job.class_id, seed=job.seed, n=job.n, deadline=deadline, **settings), settings
        settings = {"temperature": float(default.get("temperature", 1.0))}
        return PixelCNNRequest(class_id=job.class_id, seed=job.seed, n=job.n, deadline=deadline, **settings), settings

    async def _sample(self, request):
        """One request's images: it joins the engine's running batch (the request-level baseline overrides this)."""
        if self._loop is None or self._loop.done():
            self._loop = asyncio.get_running_loop().create_task(self.engine.run())
        return await self.timing.submit(self.engine, request)

    async def generate(self, job: GenerationJob) -> GenerationResult:
        start = time.perf_counter()
        request, settings = self._request(job)
        images = await self._sample(request)  # uint8 [n, 1, 28, 28]
        return GenerationResult(images.numpy()[:, 0], self.model.name, self.model.version, self.model.family,
                                (time.perf_counter() - start) * 1000, settings)

    async def log_likelihood(self, job: ImagesJob) -> LikelihoodResult:
        """pixelcnn: exact bits/dim of each image from ONE teacher-forced forward of the logits graph (the
        whole image in, every pixel's distribution out), beside the engine rather than through its step
        loop, in chunks of max_batch_rows. ValueError (HTTP 400) on diffusion, which has no likelihood."""
        start = time.perf_counter()
        if self.model.family != "pixelcnn":
            raise ValueError(f"{self.model.name} is a {self.model.family} model; likelihood needs a flow or "
                             "pixelcnn model")
        size, bits = self.config.max_batch_rows, []
        for i in range(0, len(job.images), size):
            images = job.images[i:i + size]
            feeds = {"x": images[:, None].astype(np.float32), "y": np.full(len(images), job.class_id, np.int64)}
            logits = await asyncio.to_thread(self.model.graph.run, feeds)  # [n, 256, 28, 28]
            bits.append(pixelcnn_bits_per_dim(logits, images))
        return LikelihoodResult(np.concatenate(bits), self.model.name, self.model.version, self.model.family,
                                (time.perf_counter() - start) * 1000)

    async def info(self) -> ModelInfo:
        return ModelInfo.describe(self.model.manifest, path="iterative", provider=self.model.providers.providers[0],
                                  threads=self.model.threads, settings=asdict(self.config))

    async def stats(self) -> dict:
        """The engine's gauges and counters (serving.engine.metrics), for tests and benchmarks."""
        return {k: v for k, v in vars(self.engine.core.metrics).items() if not k.startswith("_")}

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.stop()


def build_app(args: dict[str, Any]) -> Application:
    """The Serve app builder named by the config's import_path: Serve calls it with the application's args.
    Raises ValueError (at deploy time) for a bad args block or a model the store does not have."""
    from serving import request_batching  # the baseline builds on this module's deployments

    cfg = AppArgs.from_dict(args)
    store = ModelStore.open(cfg.store)
    handles, manifests = {}, {}
    for entry in cfg.models:
        try:
            # unverified, to pick the path and feed the policy (quality, latency profile); the replica verifies
            manifest = store.manifest(entry.ref)
            family = manifest.family
        except StoreError as exc:
            raise ValueError(f"cannot serve {entry.name!r} ({entry.ref}) from store {store.uri}: {exc}; "
                             "run `genserve build` to publish the shipped checkpoints") from None
        if family in ONE_PASS_GRAPH:
            deployment = OnePassDeployment if cfg.batching == "step" else request_batching.RequestBatchedOnePass
        elif family in ITERATIVE_GRAPH:
            deployment = IterativeDeployment if cfg.batching == "step" else request_batching.RequestBatchedIterative
        else:
            raise ValueError(f"{entry.ref} is a {family!r} model, which genserve does not serve")
        handles[entry.name] = deployment.options(name=entry.name).bind(store.uri, entry.ref)
        manifests[entry.name] = manifest
    return Ingress.options(name=INGRESS).bind(handles, manifests, cfg.ingress_timeout_s, cfg.admission)


# ---- running the config file: `genserve up` and the tests ------------------------------------------------

def load_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def serve_only_what_the_store_has(config: dict[str, Any], store_uri: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """A copy of the config whose genserve application serves only models the store has, with the store
    pinned to an absolute path (replicas may run in another directory). Returns it and the refs dropped.
    For laptops, where not every family may be trained yet; a cluster deploys the file as it is."""
    config = yaml.safe_load(yaml.safe_dump(config))  # deep copy
    dropped: list[str] = []
    for app in config["applications"]:
        if app.get("import_path") != "serving.app:build_app":
            continue
        args = app.setdefault("args", {})
        store = ModelStore.open(store_uri if store_uri is not None else args.get("store"))
        args["store"] = store.uri
        kept = []
        for value in args.get("models", []):
            ref = value if isinstance(value, str) else value.get("ref") or value.get("name")
            name = value.partition("@")[0] if isinstance(value, str) else value.get("name")
            try:
                store.resolve(ref)
                kept.append(value)
            except StoreError:
                dropped.append(ref)
                app["deployments"] = [d for d in app.get("deployments", []) if d.get("name") != name]
        args["models"] = kept
    return config, dropped


def deploy(config: dict[str, Any], *, timeout_s: float = 300.0) -> None:
    """What `serve run CONFIG` does, then wait until every application is RUNNING: start Serve (HTTP and gRPC
    options from the config) on the connected Ray, deploy the applications, and raise RuntimeError with Serve's
    message if one fails to deploy. Ray must be initialized."""
    from ray.serve._private import api as serve_private_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_private_api.serve_start(http_options=schema.http_options.model_dump(),
                                           grpc_options=schema.grpc_options.model_dump(),
                                           proxy_location=schema.proxy_location)
    client.deploy_apps(schema)
    names = [app.name for app in schema.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        if failed := {n: apps[n].message for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}:
            raise RuntimeError("; ".join(f"application {n} failed to deploy: {m}" for n, m in failed.items()))
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def init_ray(num_cpus: float | None = None, **kwargs: Any) -> None:
    """An embedded local Ray for `genserve up` and the tests: no dashboard. Prometheus metrics on
    METRICS_PORT unless `_metrics_export_port` says otherwise; if that port is taken, on one Ray picks
    (printed): Ray does not start on a busy metrics port."""
    if not ray.is_initialized():
        chosen = "_metrics_export_port" in kwargs
        if not chosen and _port_free(METRICS_PORT):
            kwargs["_metrics_export_port"] = METRICS_PORT
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
        if not chosen and (port := ray.nodes()[0]["MetricsExportPort"]) != METRICS_PORT:
            print(f"genserve: port {METRICS_PORT} is taken; Prometheus metrics are on port {port}", file=sys.stderr)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # where Ray's metrics agent listens
            return True
        except OSError:
            return False
