"""Session fixtures: ONE real genserve app for every test module that needs a server (OpenAI API, and the
protocols and metrics built on it). It is the app from deploy/serve_config.yaml, as `genserve up` runs it,
on a local Ray scaled to this 2-core machine, serving a store built here: the trained checkpoint of each
family where checkpoints/ has one, else a small random model. Starting Ray and Serve costs tens of
seconds, so it happens once per session, on first use."""
from __future__ import annotations

import pytest
import torch

from families.checkpoint import CARD_FILE, CHECKPOINT_ROOT, WEIGHTS_FILE
from genserve.build import JUDGE, publish_checkpoint
from model_store import ModelStore
from tests.helpers import (ONE_PASS, SERVED_FAMILIES, MAX_BATCH, MAX_WAIT_MS, METRICS_EXPORT_MS, free_port,
                           small_checkpoint)


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.gpu tests run only where an NVIDIA GPU is visible (core.runtime.gpu_present); elsewhere
    they are skipped, not failed, and stay ready for a GPU machine."""
    from core.runtime import gpu_present

    if gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (core.runtime.gpu_present() is False here)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def served_store(tmp_path_factory) -> ModelStore:
    tmp = tmp_path_factory.mktemp("served")
    store = ModelStore.open(tmp / "store")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for family in SERVED_FAMILIES:
            trained = CHECKPOINT_ROOT / family
            directory = trained if (trained / WEIGHTS_FILE).is_file() and (trained / CARD_FILE).is_file() \
                else small_checkpoint(tmp / "checkpoints", family)
            publish_checkpoint(store, directory, max_batch=2, threads=1, log=lambda _: None)
        publish_checkpoint(store, CHECKPOINT_ROOT / "classifier", model=JUDGE, max_batch=2, threads=1,
                           log=lambda _: None)  # the cascade's judge
    finally:
        torch.set_num_threads(threads)
    return store


@pytest.fixture(scope="session")
def server(served_store):
    """{"url", "grpc", "config", "metrics_port"}: the app's HTTP root, its gRPC address (host:port), the Serve
    config it runs (tests may redeploy a changed copy, and must restore it), and the port Ray exports
    Prometheus metrics on."""
    import ray
    from ray import serve

    from genserve.launch import deploy_local, load_config, on_one_node, serve_only_what_the_store_has, start_local_ray

    config, dropped = serve_only_what_the_store_has(on_one_node(load_config()), served_store.uri)
    assert dropped == []
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["grpc_options"]["port"] = grpc_port
    for d in config["applications"][0]["deployments"]:
        if d["name"] in ONE_PASS:
            d["user_config"] = {"max_batch_images": MAX_BATCH, "max_wait_ms": MAX_WAIT_MS}
        # 5 models x 0.4 = the 2 CPUs given to Ray; the ingress reserves none here
        d["ray_actor_options"] = {"num_cpus": 0 if d["name"] == "Ingress" else 0.4}
    start_local_ray(num_cpus=2, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": METRICS_EXPORT_MS})
    try:
        deploy_local(config, timeout_s=240)
        yield {"url": f"http://127.0.0.1:{port}", "grpc": f"127.0.0.1:{grpc_port}", "config": config,
               "metrics_port": metrics_port}
    finally:
        serve.shutdown()
        ray.shutdown()
