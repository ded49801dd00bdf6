"""`genserve up`: serve deploy/serve_config.yaml until Ctrl-C.

- Alone (the default): bring the local store up to date with the shipped weights (`genserve build`, a no-op
  when it is current), start an embedded Ray of its own — never one that `ray start` left on this machine —
  and serve the models that store has, on 127.0.0.1 unless --host says otherwise. Ctrl-C (or SIGTERM) at any
  moment, start-up included, stops Serve and that Ray: serving, the requests in flight finish first (a second
  Ctrl-C stops at once); no Ray process or port is left behind.
- With --address (a running cluster's dashboard, e.g. http://head:8265): submit the config to its Serve REST
  API, the way `serve deploy` and KubeRay do, wait until it runs, and follow it; Ctrl-C removes the
  application again and leaves the cluster as it was. The store must be one every node reads (--store or
  the config's args.store: an absolute path on shared storage or an s3:// URI).

The config is the same file `serve run` / `serve deploy` / KubeRay use; `up` only adapts it to where it runs."""
from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"   # a laptop's server is not the network's: --host 0.0.0.0 opens it
# A Ctrl-C that is not waiting for requests in flight (one during start-up, or the second one) stops within
# this, whatever Ray is doing: a ray.init cut short can swallow the interrupt or hang its own teardown, and
# then what is left is killed
FORCED_STOP_S = 15.0
_serving = threading.Event()   # set while the app serves: the first Ctrl-C then lets requests in flight finish
_forced_stop: threading.Timer | None = None


def local_cpus(config: dict[str, Any]) -> int:
    """The CPUs the local Ray is told it has. They are a scheduling budget: reserve what the config asks even
    on a laptop with fewer cores (the replicas share the real ones: serving.runtime.cores). Whole, as Ray
    requires (the Ingress asks 0.1)."""
    requested = sum(float((d.get("ray_actor_options") or {}).get("num_cpus", 1)) * int(d.get("num_replicas", 1))
                    for app in config["applications"] for d in app.get("deployments", []))
    return math.ceil(max(float(os.cpu_count() or 1), requested))


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"cannot serve on {host}:{port}: {exc.strerror}; pass --port") from None


def _interrupt(signum, frame):
    """SIGINT and SIGTERM: stop `up` wherever it is (KeyboardInterrupt), and unless the stop is the graceful
    one, make sure it takes at most FORCED_STOP_S."""
    global _forced_stop
    if _forced_stop is None and not _serving.is_set():
        _forced_stop = threading.Timer(FORCED_STOP_S, _force_stop)
        _forced_stop.daemon = True
        _forced_stop.start()
    _serving.clear()  # a second Ctrl-C while requests finish arms the timer too
    raise KeyboardInterrupt


def _force_stop() -> None:
    import psutil

    print(f"genserve: stopping took over {FORCED_STOP_S:.0f} s; killing what is left", file=sys.stderr, flush=True)
    for proc in psutil.Process().children(recursive=True):
        proc.kill()
    os._exit(1)


def run_up(args: argparse.Namespace) -> None:
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # started with it ignored (nohup, &): it stays so
        signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.address:
            _up_on_cluster(args)
        else:
            _up_alone(args)
    except KeyboardInterrupt:
        pass
    print("genserve: stopped", flush=True)
    if not args.address:
        # Everything is stopped (stop_local_ray). Skip the interpreter's teardown: Ray's core worker can crash
        # in it (SIGSEGV) after a ray.init that Ctrl-C cut short, which would turn a clean stop into exit -11.
        sys.stderr.flush()
        os._exit(0)


def _up_alone(args: argparse.Namespace) -> None:
    from model_store.store import ModelStore

    store = ModelStore.open(args.store)
    if not args.no_build:
        from genserve.build import build

        results = build(store, log=lambda _: None) if args.quiet_build else build(store)
        print(f"genserve: store {store.uri} is current: "
              + (", ".join(f"{r.model}@{r.version}" for r in results if r.version) or "no models"))

    import ray

    from genserve.launch import (deploy_local, load_config, on_one_node, serve_only_what_the_store_has,
                                 start_local_ray, stop_local_ray)

    config, dropped = serve_only_what_the_store_has(on_one_node(load_config(args.config)), store.uri)
    if dropped:
        print(f"genserve: not in the store, not served: {', '.join(dropped)} (train them, then `genserve build`)")
    models = [m if isinstance(m, str) else m["ref"] for app in config["applications"] for m in app["args"]["models"]]
    if not models:
        raise RuntimeError(f"store {store.uri} has none of the models {args.config} serves; run `genserve build`")
    http = config.setdefault("http_options", {})
    http["host"] = args.host or DEFAULT_HOST
    http["port"] = args.port or http.get("port", DEFAULT_PORT)
    _check_port_free(http["host"], http["port"])

    cpus = local_cpus(config)
    serving = False
    try:
        started = time.perf_counter()
        start_local_ray(num_cpus=cpus)
        deploy_local(config, timeout_s=args.timeout)
        serving = True
        _serving.set()
        where = f"http://{'127.0.0.1' if http['host'] in ('0.0.0.0', '::') else http['host']}:{http['port']}"
        print(f"genserve: serving {', '.join(models)} at {where}/v1 "
              f"(ready in {time.perf_counter() - started:.0f} s); Ctrl-C stops")
        grpc_port = config.get("grpc_options", {}).get("port")
        print(f"  playground {where}/   KServe v2 {where}/v2" + (f"   gRPC :{grpc_port}" if grpc_port else "") +
              f"   Prometheus metrics :{ray.nodes()[0]['MetricsExportPort']}/metrics")
        print(f"  curl -s {where}/v1/models")
        print(f"  curl -s {where}/v1/images/generations -H 'content-type: application/json' "
              "-d '{\"model\": \"auto\", \"prompt\": \"sneaker\", \"n\": 2, \"latency_slo_ms\": 500}'")
        while True:
            time.sleep(1.0)
    finally:
        # Serving, the first Ctrl-C lets the requests in flight finish (each replica's graceful_shutdown_timeout_s
        # bounds it; idle, it takes a second or two); a second one stops at once. Nothing is left behind either way.
        print("genserve: stopping" + (": requests in flight finish first; Ctrl-C again stops at once" if serving else ""))
        try:
            stop_local_ray(graceful=serving)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            stop_local_ray()


def _up_on_cluster(args: argparse.Namespace) -> None:
    from genserve.launch import APP_IMPORT_PATH, delete_from_cluster, deploy_to_cluster, load_config

    config = load_config(args.config)
    for app in config["applications"]:
        if app.get("import_path") == APP_IMPORT_PATH and args.store:
            app.setdefault("args", {})["store"] = args.store
    if args.host or args.port:
        config.setdefault("http_options", {}).update({k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    try:
        started = time.perf_counter()
        deploy_to_cluster(config, args.address, timeout_s=args.timeout)
        print(f"genserve: deployed {args.config} to the cluster at {args.address} "
              f"(running in {time.perf_counter() - started:.0f} s); every node's proxy serves it on port "
              f"{config.get('http_options', {}).get('port', DEFAULT_PORT)}; Ctrl-C removes it")
        while True:
            time.sleep(1.0)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("genserve: removing the application from the cluster")
        delete_from_cluster(args.address)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `genserve up` to the top-level command's subparsers."""
    from serving.config import DEFAULT_CONFIG

    p = subparsers.add_parser("up", help="serve the models (an embedded Ray, or --address a cluster) until Ctrl-C")
    p.add_argument("--store", default=None, metavar="PATH_OR_URI",
                   help="model store (default: $GENSERVE_STORE, else ./model_store_data; on a cluster, the config's)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the Serve config (default: %(default)s)")
    p.add_argument("--address", default=None, metavar="DASHBOARD_URL",
                   help="deploy to the running Ray cluster whose dashboard is here (e.g. http://head:8265), as "
                        "`serve deploy` does, instead of starting an embedded Ray")
    p.add_argument("--host", default=None, help=f"HTTP host (default: {DEFAULT_HOST}; the config's on a cluster)")
    p.add_argument("--port", type=int, default=None, help=f"HTTP port (default: the config's, {DEFAULT_PORT})")
    p.add_argument("--no-build", action="store_true", help="serve the store as it is, without `genserve build`")
    p.add_argument("--quiet-build", action="store_true", help="print only the build's summary")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the app to start")
    p.set_defaults(func=run_up)
