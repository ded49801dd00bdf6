"""Offline checks of the Kubernetes deployment (deploy/k8s) and the container images (Dockerfile*). No cluster,
no registry, no container engine: each overlay is rendered with `kubectl kustomize`, then

- the built-in kinds, and the RayService's pod templates as Pods, pass kubernetes-validate (strict);
- the RayService passes KubeRay's CRD schema (deploy/k8s/crd, vendored) with unknown fields made to fail,
  and a port of the KubeRay webhook's / controller's validation rules;
- serveConfigV2 is what deploy/k8s/render.py makes of deploy/serve_config.yaml, and Ray's ServeDeploySchema
  accepts it;
- the cluster design holds (requests = limits, named ports, GCS fault tolerance from a Secret, autoscaling,
  graceful shutdown longer than the longest request, placement of every deployment on a worker group);
- checkov finds nothing it does not skip with a reason, and hadolint nothing in the Dockerfiles;
- and each validator demonstrably fails on a broken manifest.

checkov lives in its own venv (scripts/setup_tools.sh; it pins packages older than genserve's)."""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
CRD = K8S / "crd" / "ray.io_rayservices.yaml"
K8S_VERSIONS = ("1.30.0", "1.37.0")          # the oldest Kubernetes we claim, and the newest schemas shipped
MAX_RAYSERVICE_NAME = 47                     # KubeRay: MaxRayClusterNameLength (53) - 6 for the "-xxxxx" suffix
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "grpc": 9000, "metrics": 8080}
WORKER_PORTS = {"serve": 8000, "grpc": 9000, "metrics": 8080}
POOL_LABEL = "genserve.io/pool"
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
CHECKOV_NO_REASON = ("", "No comment provided")


def _load_render():
    spec = importlib.util.spec_from_file_location("genserve_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


# ---- tools ----------------------------------------------------------------------------------------------

def _tool(name: str, env: str | None = None) -> str:
    """A command-line tool: $env, else the venv's bin/ (the test extras' wheels put kubectl and hadolint
    there), else PATH."""
    if env and os.environ.get(env):
        return os.environ[env]
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the test extras (bash scripts/setup.sh --test)")
    return found


@cache
def _checkov() -> str:
    """checkov from $GENSERVE_CHECKOV, .venv/checkov or PATH; scripts/setup_tools.sh installs it when absent."""
    if os.environ.get("GENSERVE_CHECKOV"):
        return os.environ["GENSERVE_CHECKOV"]
    local = ROOT / ".venv" / "checkov" / "bin" / "checkov"
    if not local.exists() and not shutil.which("checkov"):
        subprocess.run(["bash", str(ROOT / "scripts" / "setup_tools.sh")], check=True, timeout=900)
    return str(local) if local.exists() else shutil.which("checkov")


def kustomize(path: Path) -> list[dict]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@cache
def rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def groups(rayservice: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head and every worker group."""
    rc = rayservice["spec"]["rayClusterConfig"]
    return [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc["workerGroupSpecs"]]


def pods_of(rayservice: dict) -> list[dict]:
    """The pods KubeRay would create from the RayService's templates, as far as their specs are ours: the group's
    labels merged into the pod's, and on the head the autoscaler sidecar built from autoscalerOptions (KubeRay
    runs it on the head's image). KubeRay's own additions (probes, /dev/shm, env) are not modelled."""
    rc = rayservice["spec"]["rayClusterConfig"]
    pods = []
    for name, group in groups(rayservice):
        template = copy.deepcopy(group["template"])
        meta = template.get("metadata", {})
        meta["labels"] = {**meta.get("labels", {}), **group.get("labels", {})}
        spec = template["spec"]
        if name == "head" and rc.get("enableInTreeAutoscaling"):
            opts = rc.get("autoscalerOptions", {})
            spec["containers"].append({
                "name": "autoscaler", "image": spec["containers"][0]["image"],
                "imagePullPolicy": opts.get("imagePullPolicy", "IfNotPresent"),
                **{k: opts[k] for k in ("resources", "securityContext", "env", "envFrom", "volumeMounts") if k in opts}})
        pods.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {**meta, "name": f"{rayservice['metadata']['name']}-{name}",
                                  "namespace": rayservice["metadata"].get("namespace", "default")},
                     "spec": spec})
    return pods


def serve_config_v2(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


# ---- KubeRay's CRD schema, with unknown fields made to fail ------------------------------------------------

def _strict(schema: dict) -> None:
    """In place: every object schema that lists its properties rejects others (additionalProperties: false),
    unless it says x-kubernetes-preserve-unknown-fields or already has additionalProperties (maps such as
    labels, rayStartParams, resources). An object with no properties listed (e.g. pod templates' metadata)
    stays open: the API server checks those itself."""
    if not isinstance(schema, dict):
        return
    if "properties" in schema:
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for sub in schema["properties"].values():
            _strict(sub)
    if isinstance(schema.get("additionalProperties"), dict):
        _strict(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        _strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            _strict(sub)


@cache
def crd_validator() -> jsonschema.Draft7Validator:
    with open(CRD) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _strict(schema)
    return jsonschema.Draft7Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in crd_validator().iter_errors(doc)]


# ---- KubeRay's admission rules (pkg/webhooks/v1/rayservice_webhook.go, controllers/ray/utils/validation.go) --

def _env_names(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", [])}


def kuberay_errors(rs: dict) -> list[str]:
    """What KubeRay (the commit the vendored CRD is from) rejects in a RayService: the webhook's metadata rules and
    the controller's ValidateRayServiceSpec, with the feature gates at their defaults (off). Plus one rule of
    KubeRay's service builder: without a head container port named "serve" there is no serve Service."""
    errors = []
    meta, spec = rs["metadata"], rs["spec"]
    annotations = meta.get("annotations", {})
    name = meta["name"]
    if len(name) > MAX_RAYSERVICE_NAME:
        errors.append(f"name {name!r} is longer than {MAX_RAYSERVICE_NAME} characters")
    if not DNS_1035.match(name) or len(name) > 63:
        errors.append(f"name {name!r} is not a DNS-1035 label")
    if (timeout := annotations.get("ray.io/initializing-timeout")) and \
            not re.fullmatch(r"[1-9]\d*|(\d+(\.\d+)?(ns|us|ms|s|m|h))+", timeout):
        errors.append(f"ray.io/initializing-timeout {timeout!r} is not a positive duration")

    rc = spec["rayClusterConfig"]
    head = rc["headGroupSpec"]
    head_containers = head["template"]["spec"].get("containers", [])
    if not head_containers:
        return errors + ["headGroupSpec has no container"]
    head_container = head_containers[0]
    opts = rc.get("autoscalerOptions") or {}
    autoscaling = bool(rc.get("enableInTreeAutoscaling"))
    head_env = {e["name"]: e for e in head_container.get("env", [])}
    v2_env = head_env.get("RAY_enable_autoscaler_v2", {}).get("value") in ("1", "true")
    autoscaler_v2 = autoscaling and (opts.get("version") == "v2" or v2_env)

    for gname, group in groups(rs):
        params = group.get("rayStartParams", {})
        if not group["template"]["spec"].get("containers"):
            errors.append(f"group {gname} has no container")
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"group {gname}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"group {gname}: rayStartParams['labels'] is not supported; use labels")
        for key, value in group.get("labels", {}).items():
            if not QUALIFIED_NAME.match(key) or not LABEL_VALUE.match(str(value)) or len(str(value)) > 63:
                errors.append(f"group {gname}: invalid label {key}={value}")
        restart = group["template"]["spec"].get("restartPolicy")
        if autoscaler_v2 and restart not in (None, "", "Never"):
            errors.append(f"group {gname}: restartPolicy must be Never or unset with autoscaler v2")
        if gname == "head":
            continue
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"worker group {gname} must set minReplicas and maxReplicas")
        if (lo is not None and lo < 0) or (hi is not None and hi < 0):
            errors.append(f"worker group {gname}: negative replicas bound")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"worker group {gname}: minReplicas {lo} > maxReplicas {hi}")
        if (idle := group.get("idleTimeoutSeconds")) is not None and (idle < 0 or not autoscaler_v2):
            errors.append(f"worker group {gname}: idleTimeoutSeconds needs autoscaler v2 and must be >= 0")
        if group.get("suspend") and autoscaling:
            errors.append(f"worker group {gname} cannot be suspended with the autoscaler enabled")
        if group.get("priority") and not autoscaler_v2:
            errors.append(f"worker group {gname}: priority needs autoscaler v2")

    ft = rc.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and ft is not None:
        errors.append("ray.io/ft-enabled annotation and gcsFaultToleranceOptions are both set")
    if ft is None and not annotations.get("ray.io/ft-enabled") == "true" and "RAY_REDIS_ADDRESS" in head_env:
        errors.append("RAY_REDIS_ADDRESS without gcsFaultToleranceOptions")
    if ft is not None:
        if head.get("rayStartParams", {}).get("redis-password"):
            errors.append("redis-password in rayStartParams with gcsFaultToleranceOptions")
        for env in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if env in head_env:
                errors.append(f"{env} env var in the head with gcsFaultToleranceOptions")
        if annotations.get("ray.io/external-storage-namespace"):
            errors.append("ray.io/external-storage-namespace annotation with gcsFaultToleranceOptions")
        if ft.get("backend", "redis") == "redis" and ft.get("storage") is not None:
            errors.append("gcsFaultToleranceOptions.storage with the redis backend")
        if ft.get("backend") == "rocksdb":
            errors.append("the rocksdb GCS FT backend needs a feature gate")
    if head.get("rayStartParams", {}).get("redis-username") or "REDIS_USERNAME" in head_env:
        errors.append("redis username outside gcsFaultToleranceOptions.redisUsername")
    if autoscaling and opts.get("version") and "RAY_enable_autoscaler_v2" in head_env:
        errors.append("autoscalerOptions.version and RAY_enable_autoscaler_v2 are both set")
    if not autoscaling and v2_env:
        errors.append("RAY_enable_autoscaler_v2 without enableInTreeAutoscaling")
    if (opts.get("idleTimeoutSeconds") or 0) < 0:
        errors.append("autoscalerOptions.idleTimeoutSeconds is negative")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in {e["name"] for e in opts.get("env", [])}:
        errors.append("autoscalerOptions.env sets KUBERAY_GEN_AUTOSCALER_START_CMD")
    for gated in ("historyServerOptions", "networkPolicy", "tlsOptions"):
        if rc.get(gated) is not None:
            errors.append(f"rayClusterConfig.{gated} needs a KubeRay feature gate")
    auth = rc.get("authOptions") or {}
    if auth.get("enableK8sTokenAuth"):
        errors.append("Kubernetes token auth is not supported for RayService")
    if auth.get("mode") == "token" and not rc.get("rayVersion"):
        errors.append("authOptions.mode token needs rayVersion")
    if (head.get("headService") or {}).get("metadata", {}).get("name"):
        errors.append("headGroupSpec.headService.metadata.name must not be set")
    upgrade = (spec.get("upgradeStrategy") or {}).get("type")
    if upgrade is not None and upgrade not in ("NewClusterWithIncrementalUpgrade", "NewCluster", "None"):
        errors.append(f"upgradeStrategy.type {upgrade!r} is invalid")
    if (spec.get("rayClusterDeletionDelaySeconds") or 0) < 0:
        errors.append("rayClusterDeletionDelaySeconds is negative")
    if not any(p.get("name") == "serve" or p.get("name", "").startswith("serve-")
               for p in head_container.get("ports", [])) and spec.get("serveService") is None:
        errors.append("the head container has no port named 'serve': KubeRay creates no serve Service")
    return errors


# ---- render.py: serveConfigV2 follows deploy/serve_config.yaml ------------------------------------------------

def test_committed_manifests_match_render_py():
    stale = [str(p.relative_to(ROOT)) for p, text in render.targets().items() if p.read_text() != text]
    assert not stale, f"serveConfigV2 in {stale} differs from deploy/serve_config.yaml: run python deploy/k8s/render.py"


def test_render_follows_the_serve_config():
    config = render.load_serve_config()
    changed = copy.deepcopy(config)
    app = changed["applications"][0]
    app["args"]["ingress_timeout_s"] = 300
    for d in app["deployments"]:
        d.pop("graceful_shutdown_timeout_s", None)
        d["max_ongoing_requests"] = 7
    out = yaml.safe_load(render.render_block(changed))
    deployments = out["applications"][0]["deployments"]
    assert {d["graceful_shutdown_timeout_s"] for d in deployments} == {300 + render.GRACE_MARGIN_S}
    assert {d["max_ongoing_requests"] for d in deployments} == {7}
    assert "&" not in render.render_block(config), "YAML anchors must be written out in full"

    app["deployments"][0]["graceful_shutdown_timeout_s"] = 5      # shorter than a request may take
    with pytest.raises(render.RenderError, match="graceful_shutdown_timeout_s"):
        render.cluster_config(changed)
    local = copy.deepcopy(config)
    local["applications"][0]["args"]["store"] = "./model_store_data"   # no cluster node has it
    with pytest.raises(render.RenderError, match="store"):
        render.cluster_config(local)


def test_replace_block_keeps_the_rest_of_the_file():
    manifest = "a: 1\nspec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n  rayClusterConfig: {}\n"
    assert render.replace_block(manifest, "new: 2\n") == "a: 1\nspec:\n  serveConfigV2: |\n    new: 2\n  rayClusterConfig: {}\n"


# ---- rendering and schemas ------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    kinds = sorted(d["kind"] for d in rendered(overlay))
    assert kinds == sorted(["Namespace", "ConfigMap", "RayService", "Service", "PodMonitor", "NetworkPolicy"]), kinds
    rs = one(rendered(overlay), "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    assert {d["metadata"].get("namespace") for d in rendered(overlay) if d["kind"] != "Namespace"} == {"genserve"}
    assert [g for g, _ in groups(rs)] == (["head", "cpu", "gpu"] if overlay == "gpu" else ["head", "cpu"])
    images = {c["image"] for pod in pods_of(rs) for c in pod["spec"]["containers"]}
    assert all(i.startswith("registry.example.com/genserve") for i in images), images   # the overlay's images:


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_and_pod_templates_pass_kubernetes_validate(overlay, version):
    import kubernetes_validate

    docs = rendered(overlay)
    builtin = [d for d in docs if "/" not in d["apiVersion"] or d["apiVersion"].split("/")[0].endswith("k8s.io")]
    assert {d["kind"] for d in builtin} == {"Namespace", "ConfigMap", "Service", "NetworkPolicy"}
    for doc in builtin + pods_of(one(docs, "RayService")):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} ({overlay}, Kubernetes {version}): "
                        f"{'/'.join(map(str, exc.path))}: {exc.message}")


def test_kubernetes_validate_rejects_an_unknown_pod_field():
    import kubernetes_validate

    pod = pods_of(one(rendered("cpu"), "RayService"))[1]
    pod["spec"]["containers"][0]["resource"] = pod["spec"]["containers"][0].pop("resources")   # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_passes_kuberays_crd_schema(overlay):
    errors = crd_errors(one(rendered(overlay), "RayService"))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path, key", [
    (("spec",), "serveConfig"),                                              # v1alpha1's field, gone in v1
    (("spec", "rayClusterConfig"), "enableAutoscaling"),
    (("spec", "rayClusterConfig", "gcsFaultToleranceOptions"), "redisPasswordSecret"),
    (("spec", "rayClusterConfig", "headGroupSpec"), "rayStartParam"),
    (("spec", "rayClusterConfig", "autoscalerOptions"), "idleTimeout"),
    (("spec", "rayClusterConfig", "headGroupSpec", "template", "spec"), "terminationGracePeriod"),
])
def test_crd_schema_rejects_unknown_fields(path, key):
    rs = copy.deepcopy(one(rendered("cpu"), "RayService"))
    node = rs
    for part in path:
        node = node[part]
    node[key] = 1
    errors = crd_errors(rs)
    assert any(key in e for e in errors), errors


def test_crd_schema_rejects_a_wrong_type():
    rs = copy.deepcopy(one(rendered("cpu"), "RayService"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "two"
    assert crd_errors(rs)


# ---- KubeRay's admission rules --------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_passes_kuberays_validation(overlay):
    assert kuberay_errors(one(rendered(overlay), "RayService")) == []


def _broken(change) -> dict:
    rs = copy.deepcopy(one(rendered("cpu"), "RayService"))
    change(rs)
    return rs


@pytest.mark.parametrize("change, expected", [
    (lambda rs: rs["metadata"].update(name="g" * 48), "longer than 47"),
    (lambda rs: rs["metadata"].update(name="genserve_prod"), "DNS-1035"),
    (lambda rs: rs["metadata"].update(name="1genserve"), "DNS-1035"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"].update(headService={"metadata": {"name": "x"}}),
     "headService"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"redis-password": "x"}),
     "redis-password"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"].update(resources={"CPU": "0"}), "both"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2),
     "minReplicas 5 > maxReplicas 2"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"].update(
        restartPolicy="Always"), "restartPolicy"),
    (lambda rs: rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].pop(3),
     "no port named 'serve'"),
    (lambda rs: rs["spec"].update(upgradeStrategy={"type": "BlueGreen"}), "upgradeStrategy"),
])
def test_kuberay_validation_rejects(change, expected):
    errors = kuberay_errors(_broken(change))
    assert any(expected in e for e in errors), errors


# ---- serveConfigV2 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_passes_rays_schema(overlay):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config_v2(one(rendered(overlay), "RayService"))
    schema = ServeDeploySchema.model_validate(config)
    assert [a.name for a in schema.applications] == ["genserve"]
    assert config == render.cluster_config(render.load_serve_config(), gpu=overlay == "gpu")


def test_rays_schema_rejects_a_bad_serve_config():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    config = serve_config_v2(one(rendered("cpu"), "RayService"))
    config["applications"][0]["deployments"][0]["num_replicas"] = -1
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(config)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_a_worker_group_to_run_on(overlay):
    """Each deployment's label_selector names a worker group's Ray labels (never the head), and one that asks
    for GPUs lands on a group whose pods have nvidia.com/gpu."""
    rs = one(rendered(overlay), "RayService")
    workers = {name: g for name, g in groups(rs) if name != "head"}
    for d in serve_config_v2(rs)["applications"][0]["deployments"]:
        actor = d.get("ray_actor_options", {})
        selector = actor.get("label_selector")
        assert selector, f"{d['name']} has no label_selector: it could be placed on the head"
        matches = [n for n, g in workers.items() if selector.items() <= g.get("labels", {}).items()]
        assert len(matches) == 1, f"{d['name']}: {selector} matches worker groups {matches}"
        limits = workers[matches[0]]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert bool(actor.get("num_gpus")) == ("nvidia.com/gpu" in limits), d["name"]
    if overlay == "gpu":
        placed = {d["name"]: d["ray_actor_options"]["label_selector"][POOL_LABEL]
                  for d in serve_config_v2(rs)["applications"][0]["deployments"]}
        assert placed["diffusion"] == placed["pixelcnn"] == "gpu"


# ---- the cluster design ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_design(overlay):
    docs = rendered(overlay)
    rs = one(docs, "RayService")
    spec, rc = rs["spec"], rs["spec"]["rayClusterConfig"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    assert rc["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]["resources"]

    # GCS fault tolerance on an external Redis whose password comes from a Secret
    ft = rc["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] and "value" not in ft["redisPassword"]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]

    pods = pods_of(rs)
    for pod in pods:
        name = pod["metadata"]["name"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in pod["spec"]["containers"]:
            where = f"{name}/{c['name']}"
            res = c["resources"]
            assert res["requests"] == res["limits"] and {"cpu", "memory"} <= res["limits"].keys(), where
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            for env in c.get("env", []):
                assert not (SECRETISH.search(env["name"]) and "value" in env), f"{where}: literal {env['name']}"
        ray = pod["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in ray["ports"]}
        assert ports == (HEAD_PORTS if name.endswith("-head") else WORKER_PORTS), name
        # the model store: an s3:// URI from the ConfigMap, credentials from the Secret
        env = {e["name"]: e for e in ray["env"]}
        assert env["GENSERVE_STORE"]["valueFrom"]["configMapKeyRef"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "genserve-s3", key
    assert one(docs, "ConfigMap")["data"]["GENSERVE_STORE"].startswith("s3://")
    assert serve_config_v2(rs)["applications"][0]["args"]["store"] is None   # so the pods' GENSERVE_STORE applies
    if overlay == "gpu":
        gpu = dict(groups(rs))["gpu"]["template"]["spec"]["containers"][0]["resources"]
        assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_shutdown_outlasts_the_longest_request(overlay):
    """A request may take ingress_timeout_s; a stopping replica waits graceful_shutdown_timeout_s for its
    requests; a worker pod waits for its replicas and Serve's proxy draining (30 s) before KubeRay's
    terminationGracePeriodSeconds runs out; the old cluster of an upgrade outlives its last request."""
    rs = one(rendered(overlay), "RayService")
    config = serve_config_v2(rs)["applications"][0]
    longest = config["args"]["ingress_timeout_s"]
    graces = [d["graceful_shutdown_timeout_s"] for d in config["deployments"]]
    assert min(graces) >= longest
    assert rs["spec"]["rayClusterDeletionDelaySeconds"] >= longest
    for name, group in groups(rs):
        if name == "head":
            continue
        pod = group["template"]["spec"]
        period = pod["terminationGracePeriodSeconds"]
        assert period >= max(graces) + 30, name
        hook = " ".join(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
        bounds = [int(x) for x in re.findall(r"(?:timeout|--deadline-remaining-seconds) (\d+)", hook)]
        assert bounds and max(bounds) < period and min(bounds) >= max(graces), (name, bounds)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_service_and_podmonitor_select_the_ray_pods(overlay):
    docs = rendered(overlay)
    rs = one(docs, "RayService")
    pods = pods_of(rs)
    workers = [p for p in pods if not p["metadata"]["name"].endswith("-head")]
    grpc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "genserve-grpc")
    selector = dict(grpc["spec"]["selector"])
    # the labels KubeRay puts on serve-ready worker pods, and ours on the templates
    assert selector.pop("ray.io/serve") == "true" and selector.pop("ray.io/node-type") == "worker"
    assert all(selector.items() <= p["metadata"]["labels"].items() for p in workers)
    (port,) = grpc["spec"]["ports"]
    assert port["port"] == 9000 and all(
        any(cp["name"] == port["targetPort"] for cp in p["spec"]["containers"][0]["ports"]) for p in workers)

    monitor = one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert all(monitor["spec"]["selector"]["matchLabels"].items() <= p["metadata"]["labels"].items() for p in pods)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert all(any(cp["name"] == endpoint["port"] for cp in p["spec"]["containers"][0]["ports"]) for p in pods)

    policy = one(docs, "NetworkPolicy")
    assert all(policy["spec"]["podSelector"]["matchLabels"].items() <= p["metadata"]["labels"].items() for p in pods)


# ---- checkov --------------------------------------------------------------------------------------------

def checkov_results(tmp: Path) -> dict:
    """checkov over every overlay's rendered manifests plus the RayService's pods (checkov's container checks
    know Pods, not the RayService CRD), and over one deliberately bad Pod: {file stem: results}."""
    for overlay in OVERLAYS:
        docs = list(rendered(overlay))
        docs += pods_of(one(docs, "RayService"))
        (tmp / f"{overlay}.yaml").write_text(yaml.safe_dump_all(docs))
    bad = copy.deepcopy(pods_of(one(rendered("cpu"), "RayService"))[1])
    bad["metadata"]["name"] = "bad"
    bad["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    (tmp / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([_checkov(), "--directory", str(tmp), "--framework", "kubernetes", "--output", "json",
                          "--compact", "--skip-download"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "LOG_LEVEL": "ERROR"})
    assert out.returncode in (0, 1), out.stderr[-3000:]
    report = json.loads(out.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0
    by_file: dict[str, dict] = {}
    for status in ("passed_checks", "failed_checks", "skipped_checks"):
        for check in report["results"][status]:
            by_file.setdefault(Path(check["file_path"]).stem, {}).setdefault(status, []).append(check)
    return by_file


@pytest.fixture(scope="module")
def checkov(tmp_path_factory):
    return checkov_results(tmp_path_factory.mktemp("checkov"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_passes_with_every_skip_explained(checkov, overlay):
    results = checkov[overlay]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results.get("failed_checks", [])]
    assert not failed, "\n".join(failed)
    for check in results.get("skipped_checks", []):
        reason = check["check_result"].get("suppress_comment", "")
        assert reason not in CHECKOV_NO_REASON, f"{check['check_id']} on {check['resource']} skipped without a reason"
    # the pods were really checked: the container checks passed on them
    pod_checks = {c["check_id"] for c in results["passed_checks"] if c["resource"].startswith("Pod.")}
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_37", "CKV2_K8S_6"} <= pod_checks


def test_checkov_fails_a_privileged_pod(checkov):
    failed = {c["check_id"] for c in checkov["bad"].get("failed_checks", [])}
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_22"} <= failed


# ---- container images -----------------------------------------------------------------------------------

DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")


def _hadolint(*paths: str) -> list[dict]:
    out = subprocess.run([_tool("hadolint"), "--format", "json", *paths], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    return json.loads(out.stdout or "[]")


def test_dockerfiles_pass_hadolint():
    findings = _hadolint(*DOCKERFILES)
    assert not findings, "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    assert {"DL3007", "DL3013"} <= {f["code"] for f in _hadolint(str(bad))}


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_matches_the_cluster(dockerfile):
    """The image's Ray is the venv's and the RayService's; it runs as the ray user; it has wget (KubeRay's
    probes) and pgrep (the preStop hook); torch 2.13.0's CPU build goes in before genserve, as in setup.sh."""
    import ray

    text = (ROOT / dockerfile).read_text()
    flavour = "gpu" if dockerfile.endswith(".gpu") else "cpu"
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-py311-{flavour}"
    assert one(rendered(flavour), "RayService")["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users[-1] == "1000:100"
    assert re.search(r"apt-get install [^\n]*\bwget\b[^\n]*\bprocps\b", text)
    torch_at = text.index("torch==2.13.0")
    assert "download.pytorch.org/whl/cpu" in text[text.rfind("\n", 0, torch_at):torch_at]
    assert torch_at < text.index("pip install --no-cache-dir -e .")
    assert 'genserve build --store "$GENSERVE_STORE"' in text
    if flavour == "gpu":
        assert "onnxruntime-gpu" in text and "tensorrt" in text and "pip uninstall -y onnxruntime" in text


def test_dockerignore_keeps_local_state_out():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "model_store_data", "runs", "**/__pycache__"} <= ignored
    assert not {"checkpoints", "deploy/serve_config.yaml", "README.md", "pyproject.toml"} & ignored
