"""Starting Ray and deploying the Serve config: what `genserve up`, the tests and the benchmarks do with
deploy/serve_config.yaml on one machine (an embedded Ray), or on a running cluster (its dashboard's Serve
REST API, the way `serve deploy` and KubeRay do it). The application itself is serving.app's; this module
only runs it."""
from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve

from model_store.errors import StoreError
from model_store.store import ModelStore
from serving.config import DEFAULT_CONFIG
from serving.observability import METRICS_PORT

APP_IMPORT_PATH = "serving.app:build_app"   # genserve's application in a Serve config


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def on_one_node(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of the (cluster) config for one machine: one replica per model. Spreading replicas over nodes
    (max_replicas_per_node) and autoscaling between cluster-sized bounds mean nothing on a single node, where
    they would only leave replicas pending."""
    config = yaml.safe_load(yaml.safe_dump(config))  # deep copy
    for app in config["applications"]:
        for d in app.get("deployments", []):
            d.pop("max_replicas_per_node", None)
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 1
    return config


def serve_only_what_the_store_has(config: dict[str, Any], store_uri: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """A copy of the config whose genserve application serves only models the store has, with the store
    pinned to an absolute path (replicas may run in another directory). Returns it and the refs dropped.
    For laptops, where not every family may be trained yet; a cluster deploys the file as it is."""
    config = yaml.safe_load(yaml.safe_dump(config))  # deep copy
    dropped: list[str] = []
    for app in config["applications"]:
        if app.get("import_path") != APP_IMPORT_PATH:
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


def deploy_local(config: dict[str, Any], *, timeout_s: float = 300.0) -> None:
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
    _wait_running(lambda: {n: (a.status, a.message) for n, a in serve.status().applications.items()},
                  [app.name for app in schema.applications], timeout_s)


def start_local_ray(num_cpus: float | None = None, **kwargs: Any) -> None:
    """A NEW embedded Ray for `genserve up` and the tests, never a cluster that `ray start` left running on this
    machine (ray.init() would join that one, and then refuse num_cpus): address="local". No dashboard.
    Prometheus metrics on METRICS_PORT unless `_metrics_export_port` says otherwise; if that port is taken, on
    one Ray picks (printed): Ray does not start on a busy metrics port."""
    if ray.is_initialized():
        return
    chosen = "_metrics_export_port" in kwargs
    if not chosen and _port_free(METRICS_PORT):
        kwargs["_metrics_export_port"] = METRICS_PORT
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    if not chosen and (port := ray.nodes()[0]["MetricsExportPort"]) != METRICS_PORT:
        print(f"genserve: port {METRICS_PORT} is taken; Prometheus metrics are on port {port}", file=sys.stderr)


def stop_local_ray(*, graceful: bool = False) -> None:
    """Stop Serve and the embedded Ray, and then whatever Ray started that outlived them: Ctrl-C inside
    ray.init can leave its agents orphaned (their raylet killed before it stopped them). Safe to call at any
    point of start-up, and when Ray never started. graceful: delete the applications first, so that every
    replica finishes its requests in flight (within its graceful_shutdown_timeout_s; a replica with none stops
    at once) while the proxies still carry their answers back."""
    import psutil

    started = psutil.Process().children(recursive=True)  # raylet, GCS, agents, workers: all descend from us
    try:
        if ray.is_initialized():
            if graceful:
                for app in serve.status().applications:
                    serve.delete(app)
            serve.shutdown()
    finally:
        ray.shutdown()
        _, alive = psutil.wait_procs(started, timeout=5)
        for proc in alive:
            proc.kill()


def deploy_to_cluster(config: dict[str, Any], dashboard: str, *, timeout_s: float = 300.0) -> None:
    """What `serve deploy CONFIG --address DASHBOARD` does, then wait until every application is RUNNING: the
    config goes to the running cluster's Serve REST API (as KubeRay submits serveConfigV2), whose controller
    deploys it; nothing runs in this process. Raises RuntimeError with Serve's message if one fails."""
    client = _serve_client(dashboard)
    client.deploy_applications(config)
    names = [app["name"] for app in config["applications"]]
    _wait_running(lambda: {n: (a["status"], a.get("message", "")) for n, a in
                           (client.get_serve_details().get("applications") or {}).items()}, names, timeout_s)


def delete_from_cluster(dashboard: str) -> None:
    """Remove the Serve applications from the cluster (what `genserve up --address` deployed); the cluster stays."""
    _serve_client(dashboard).delete_applications()


def _serve_client(dashboard: str):
    """The dashboard's Serve REST client, sending this machine's Ray token (~/.ray/auth_token, $RAY_AUTH_TOKEN)
    when there is one: clusters started by Ray >= 2.5x require it unless RAY_AUTH_MODE=disabled. As `ray start`
    and ray.init do."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    return ServeSubmissionClient(dashboard)


def _wait_running(statuses, names: list[str], timeout_s: float) -> None:
    """Poll statuses() -> {app: (status, message)} until every app in names is RUNNING; raise on a failure or
    at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        apps = statuses()
        states = {n: apps.get(n, ("NOT_STARTED", ""))[0] for n in names}
        if failed := {n: apps[n][1] for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}:
            raise RuntimeError("; ".join(f"application {n} failed to deploy: {m}" for n, m in failed.items()))
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.5)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # where Ray's metrics agent listens
            return True
        except OSError:
            return False
