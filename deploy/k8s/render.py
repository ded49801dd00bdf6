"""Render KubeRay's `serveConfigV2` from deploy/serve_config.yaml, the one Serve config, into the manifests:

    python deploy/k8s/render.py           rewrite the serveConfigV2 blocks below (nothing else in the files)
    python deploy/k8s/render.py --check   exit 1 if a committed block differs from what the config renders

Targets: deploy/k8s/base/rayservice.yaml (the base, CPU) and deploy/k8s/overlays/gpu/serve-config-gpu.yaml
(the gpu overlay's patch). tests/test_deploy_k8s.py runs the --check comparison.

The rendered config is serve_config.yaml with these cluster substitutions and no others:
  1. every deployment: graceful_shutdown_timeout_s = args.ingress_timeout_s + 10 s, so a replica being
     stopped (scale-down, node drain, upgrade) finishes its longest request first; a value the config already
     sets is kept if it is at least ingress_timeout_s, and an error otherwise.
  2. every deployment: ray_actor_options.label_selector {genserve.io/pool: cpu} unless it has one: the Ray
     node label of the CPU worker group. It keeps replicas off the head whatever they reserve (a 0-CPU one
     would fit on its num-cpus 0) and, in the gpu overlay, the CPU models off the GPU nodes, whose CPUs the
     GPU replicas need.
  3. gpu overlay only: diffusion and pixelcnn (the iterative models, whose many forwards per request gain the
     most from a GPU) get num_gpus 0.5 each, so both share one GPU, and {genserve.io/pool: gpu}.
args.store must be null or an object-store URI: with null (the file's default) the pods read GENSERVE_STORE
from the genserve-config ConfigMap (deploy/k8s/base/kustomization.yaml), which holds the s3:// URI.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "deploy" / "serve_config.yaml"
K8S = ROOT / "deploy" / "k8s"
BASE_MANIFEST = K8S / "base" / "rayservice.yaml"
GPU_PATCH = K8S / "overlays" / "gpu" / "serve-config-gpu.yaml"

APP_IMPORT_PATH = "serving.app:build_app"  # genserve's application in the config
GRACE_MARGIN_S = 10                         # graceful_shutdown_timeout_s = ingress_timeout_s + this
POOL_LABEL = "genserve.io/pool"             # the Ray node label the worker groups set (labels: in the RayService)
GPU_SHARE = {"diffusion": 0.5, "pixelcnn": 0.5}  # gpu overlay: deployment -> num_gpus per replica

_BLOCK_KEY = "serveConfigV2"


class RenderError(ValueError):
    """serve_config.yaml cannot be rendered for the cluster (the message says what to change)."""


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def _genserve_app(config: dict[str, Any]) -> dict[str, Any]:
    apps = [a for a in config.get("applications", []) if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise RenderError(f"{SERVE_CONFIG.name} must have exactly one application with import_path "
                          f"{APP_IMPORT_PATH}, found {len(apps)}")
    return apps[0]


def cluster_config(config: dict[str, Any], *, gpu: bool = False) -> dict[str, Any]:
    """serve_config.yaml's content with the cluster substitutions (module docstring) applied; a new dict."""
    config = copy.deepcopy(config)
    app = _genserve_app(config)
    args = app.get("args") or {}
    store = args.get("store")
    if store is not None and "://" not in str(store):
        raise RenderError(f"args.store is {store!r}, a local path no cluster node has: set it to null (pods then "
                          "read GENSERVE_STORE from the genserve-config ConfigMap) or to an object-store URI")
    timeout_s = args.get("ingress_timeout_s", 120)
    grace_s = timeout_s + GRACE_MARGIN_S

    deployments = app.get("deployments") or []
    names = {d["name"] for d in deployments}
    if gpu and not names & set(GPU_SHARE):
        raise RenderError(f"the gpu overlay places {sorted(GPU_SHARE)} on GPUs, but the config deploys none of them")
    for d in deployments:
        given = d.get("graceful_shutdown_timeout_s")
        if given is None:
            d["graceful_shutdown_timeout_s"] = grace_s
        elif given < timeout_s:
            raise RenderError(f"deployment {d['name']}: graceful_shutdown_timeout_s {given} is shorter than "
                              f"ingress_timeout_s {timeout_s}: a replica stopped mid-request would drop it")
        actor = d.setdefault("ray_actor_options", {})
        pool = "gpu" if gpu and d["name"] in GPU_SHARE else "cpu"
        if pool == "gpu":
            actor["num_gpus"] = GPU_SHARE[d["name"]]
            actor["label_selector"] = {POOL_LABEL: "gpu"}
        else:
            actor.setdefault("label_selector", {POOL_LABEL: pool})
    return config


def render_block(config: dict[str, Any], *, gpu: bool = False) -> str:
    """The serveConfigV2 text (unindented) for the base, or for the gpu overlay."""
    app = _genserve_app(config)
    grace = (app.get("args") or {}).get("ingress_timeout_s", 120) + GRACE_MARGIN_S
    rendered = cluster_config(config, gpu=gpu)
    gpus = ", ".join(f"{name} num_gpus {share}" for name, share in GPU_SHARE.items())
    pools = (f"{{{POOL_LABEL}: gpu}} for {' and '.join(GPU_SHARE)} ({gpus}), {{{POOL_LABEL}: cpu}} for the rest"
             if gpu else f"{{{POOL_LABEL}: cpu}}")
    header = ("GENERATED by deploy/k8s/render.py from deploy/serve_config.yaml: edit that file, then run "
              "`python deploy/k8s/render.py`. Cluster substitutions: graceful_shutdown_timeout_s "
              f"{grace} (ingress_timeout_s + {GRACE_MARGIN_S}) where a deployment sets none; label_selector "
              f"{pools}. args.store null: the pods read GENSERVE_STORE from the genserve-config ConfigMap.")
    header = "".join(f"# {line}\n" for line in textwrap.wrap(header, 104))
    body = yaml.dump(rendered, Dumper=_NoAliases, sort_keys=False, default_flow_style=False, width=120)
    return header + body


class _NoAliases(yaml.SafeDumper):
    """Writes shared values (the config's `&one_pass_scaling` anchors) out in full: KubeRay and readers see
    each deployment's settings where they apply."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def replace_block(manifest: str, block: str) -> str:
    """The manifest text with its `serveConfigV2: |` literal block's content replaced by `block`, indented two
    spaces deeper than the key. The block runs until the first non-blank line indented no deeper than the key."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if re.match(rf"^(\s*){_BLOCK_KEY}: \|\s*$", line)]
    if len(starts) != 1:
        raise RenderError(f"expected exactly one '{_BLOCK_KEY}: |' line, found {len(starts)}")
    start = starts[0]
    key_indent = len(lines[start]) - len(lines[start].lstrip(" "))
    end = start + 1
    while end < len(lines) and (not lines[end].strip()
                                or len(lines[end]) - len(lines[end].lstrip(" ")) > key_indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # trailing blank lines stay outside the block
        end -= 1
    pad = " " * (key_indent + 2)
    body = [pad + line if line.strip() else "\n" for line in block.splitlines(keepends=True)]
    return "".join(lines[:start + 1] + body + lines[end:])


def targets(config: dict[str, Any] | None = None) -> dict[Path, str]:
    """Each manifest file -> its text with the serveConfigV2 block rendered from `config` (default: the file)."""
    config = load_serve_config() if config is None else config
    return {BASE_MANIFEST: replace_block(BASE_MANIFEST.read_text(), render_block(config)),
            GPU_PATCH: replace_block(GPU_PATCH.read_text(), render_block(config, gpu=True))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale manifests (exit 1)")
    opts = parser.parse_args(argv)
    try:
        rendered = targets()
    except RenderError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    stale = [path for path, text in rendered.items() if path.read_text() != text]
    for path in stale:
        rel = path.relative_to(ROOT)
        if opts.check:
            print(f"{rel}: serveConfigV2 is stale; run python deploy/k8s/render.py", file=sys.stderr)
        else:
            path.write_text(rendered[path])
            print(f"wrote {rel}")
    return 1 if opts.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
