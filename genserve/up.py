"""`genserve up`: bring the local store up to date with the shipped weights (`genserve build`, a no-op when
it is current), then serve it from deploy/serve_config.yaml on an embedded local Ray until Ctrl-C.

The Serve config is the same file `serve run` / `serve deploy` / KubeRay use; `up` only adapts it to this
machine: the local store (absolute), the models that store has, and --host / --port."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8000


def _requested_cpus(config: dict[str, Any]) -> float:
    return sum(float((d.get("ray_actor_options") or {}).get("num_cpus", 1)) * int(d.get("num_replicas", 1))
               for app in config["applications"] for d in app.get("deployments", []))


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"cannot serve on {host}:{port}: {exc.strerror}; pass --port") from None


def run_up(args: argparse.Namespace) -> None:
    from model_store.store import ModelStore

    store = ModelStore.open(args.store)
    if not args.no_build:
        from genserve.build import build

        results = build(store, log=lambda _: None) if args.quiet_build else build(store)
        print(f"genserve: store {store.uri} is current: "
              + (", ".join(f"{r.model}@{r.version}" for r in results if r.version) or "no models"))

    import ray
    from ray import serve

    from serving.app import deploy, init_ray, load_config, serve_only_what_the_store_has

    config, dropped = serve_only_what_the_store_has(load_config(args.config), store.uri)
    if dropped:
        print(f"genserve: not in the store, not served: {', '.join(dropped)} (train them, then `genserve build`)")
    models = [m if isinstance(m, str) else m["ref"] for app in config["applications"] for m in app["args"]["models"]]
    if not models:
        raise RuntimeError(f"store {store.uri} has none of the models {args.config} serves; run `genserve build`")
    http = config.setdefault("http_options", {})
    http["host"] = args.host or http.get("host", "127.0.0.1")
    http["port"] = args.port or http.get("port", DEFAULT_PORT)
    _check_port_free(http["host"], http["port"])

    # Ray's CPUs are a scheduling budget: reserve what the config asks even on a laptop with fewer cores
    # (ONNX Runtime's threads still follow each replica's num_cpus).
    cpus = max(float(os.cpu_count() or 1), _requested_cpus(config))
    stop = threading.Event()
    init_ray(num_cpus=cpus)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        started = time.perf_counter()
        deploy(config, timeout_s=args.timeout)
        where = f"http://{'127.0.0.1' if http['host'] in ('0.0.0.0', '::') else http['host']}:{http['port']}"
        print(f"genserve: serving {', '.join(models)} at {where}/v1 "
              f"(ready in {time.perf_counter() - started:.0f} s); Ctrl-C stops")
        grpc_port = config.get("grpc_options", {}).get("port")
        print(f"  playground {where}/   KServe v2 {where}/v2" + (f"   gRPC :{grpc_port}" if grpc_port else "") +
              f"   Prometheus metrics :{ray.nodes()[0]['MetricsExportPort']}/metrics")
        print(f"  curl -s {where}/v1/models")
        print(f"  curl -s {where}/v1/images/generations -H 'content-type: application/json' "
              "-d '{\"model\": \"auto\", \"prompt\": \"sneaker\", \"n\": 2, \"latency_slo_ms\": 500}'")
        while not stop.wait(1.0):
            pass
        print("genserve: stopping")
    finally:
        serve.shutdown()
        ray.shutdown()
    print("genserve: stopped")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `genserve up` to the top-level command's subparsers."""
    from serving.config import DEFAULT_CONFIG

    p = subparsers.add_parser("up", help="build the local store if needed, then serve it over HTTP (Ctrl-C stops)")
    p.add_argument("--store", default=None, metavar="PATH_OR_URI",
                   help="model store (default: $GENSERVE_STORE, else ./model_store_data)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the Serve config (default: %(default)s)")
    p.add_argument("--host", default=None, help="HTTP host (default: the config's, 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help=f"HTTP port (default: the config's, {DEFAULT_PORT})")
    p.add_argument("--no-build", action="store_true", help="serve the store as it is, without `genserve build`")
    p.add_argument("--quiet-build", action="store_true", help="print only the build's summary")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the app to start")
    p.set_defaults(func=run_up)
