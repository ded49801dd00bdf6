"""The genserve Ray Serve application, built from ONE Serve config file (deploy/serve_config.yaml):

    applications[genserve].import_path = serving.app:build_app   # this module's app builder
    applications[genserve].args        = AppArgs: store, models, judge, ingress_timeout_s,
                                         batching
    applications[genserve].deployments = Ingress + one per model, named after it, with user_config

`serve run deploy/serve_config.yaml`, `serve deploy deploy/serve_config.yaml`, `genserve up` and KubeRay's
serveConfigV2 all read that file. build_app looks each model up in the store once, to pick its path by
family: one-pass (gan, vae, flow: serving.onepass) or iterative (diffusion, pixelcnn: serving.engine); each
replica then loads its version with every hash verified. The cascade's judge (args.judge: the classifier,
serving.judge) is a deployment beside them, handed to the ingress apart from the models it generates with. Starting Ray and deploying the file is the
command line's business (genserve/launch.py).
"""
from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from model_store.errors import StoreError
from model_store.store import ModelStore
from serving import request_batching
from serving.api.ingress import Ingress
from serving.config import ITERATIVE_GRAPH, ONE_PASS_GRAPH, AppArgs
from serving.engine.deployment import IterativeDeployment
from serving.judge import JUDGE
from serving.judge.deployment import GRAPH as JUDGE_GRAPH, JudgeDeployment
from serving.onepass.deployment import OnePassDeployment

INGRESS = "Ingress"   # the ingress deployment's name in the config
logger = logging.getLogger("ray.serve")


def build_app(args: dict[str, Any]) -> Application:
    """The Serve app builder named by the config's import_path: Serve calls it with the application's args.
    Raises ValueError (at deploy time) for a bad args block or a model the store does not have."""
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
    return Ingress.options(name=INGRESS).bind(handles, manifests, cfg.ingress_timeout_s, cfg.admission,
                                              cfg.default_slo_ms, _judge(store, cfg.judge))


def _judge(store: ModelStore, ref: str | None):
    """The judge's deployment, bound; None without args.judge, or (with a warning: the app serves without
    cascades, as `genserve up` serves without a family the store lacks) when the store does not have it."""
    if ref is None:
        return None
    try:
        family = store.manifest(ref).family
    except StoreError as exc:
        logger.warning("genserve: no cascade judge: %s is not in store %s (%s); run `genserve build`", ref,
                       store.uri, exc)
        return None
    if family not in JUDGE_GRAPH:
        raise ValueError(f"args.judge: {ref} is a {family!r} model; the judge is a classifier")
    return JudgeDeployment.options(name=JUDGE).bind(store.uri, ref)
