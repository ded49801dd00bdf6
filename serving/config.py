"""Settings of the Serve application, as typed dataclasses read from the Serve config file
(deploy/serve_config.yaml): `AppArgs` from the application's `args`, `OnePassConfig` and
`IterativeConfig` from each model deployment's `user_config` (changeable live through reconfigure).

Every check raises ValueError with a message naming the field and the value received, so a bad
config fails at deploy time, not at the first request."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from core.checks import is_int, is_number

# The one Serve config: genserve up, serve run / serve deploy, and KubeRay's serveConfigV2
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"

# family -> the graph its deployment samples with
ONE_PASS_GRAPH = {"gan": "generate", "vae": "decode", "flow": "sample"}
ITERATIVE_GRAPH = {"diffusion": "denoise", "pixelcnn": "step"}


def _unknown_keys(what: str, given: dict[str, Any], cls: type) -> None:
    known = {f.name for f in fields(cls)}
    if extra := sorted(set(given) - known):
        raise ValueError(f"{what}: unknown keys {extra}; known: {sorted(known)}")


@dataclass(frozen=True)
class OnePassConfig:
    """user_config of a one-pass (gan / vae / flow) deployment."""

    # Images per forward. 64 is the top of the latency profile `genserve build` measures, and on a CPU
    # the per-image cost has flattened well before it; a request for more images spans several batches.
    max_batch_images: int = 64
    # How long the first queued image waits for batch-mates. A few ms is small next to a forward at
    # batch 64 (tens of ms on CPU) and lets concurrent requests share it.
    max_wait_ms: float = 5.0

    def __post_init__(self):
        if not is_int(self.max_batch_images) or self.max_batch_images < 1:
            raise ValueError(f"max_batch_images must be an integer >= 1, got {self.max_batch_images!r}")
        if not (is_number(self.max_wait_ms) and self.max_wait_ms >= 0):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {self.max_wait_ms!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> OnePassConfig:
        d = d or {}
        _unknown_keys("one-pass user_config", d, cls)
        return cls(**d)


@dataclass(frozen=True)
class IterativeConfig:
    """user_config of an iterative (diffusion / pixelcnn) deployment."""

    # Rows per engine step (a guided diffusion image takes two); the same ceiling as the one-pass batch.
    max_batch_rows: int = 64
    # Rows that may wait for room in the batch; a request that would queue past it is refused at once (HTTP
    # 503 + Retry-After). Four full batches: enough to keep the batch full between admissions, little enough
    # that a request queued last still starts within four batches' time instead of waiting out its deadline.
    max_waiting_rows: int = 256

    def __post_init__(self):
        if not is_int(self.max_batch_rows) or self.max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be an integer >= 1, got {self.max_batch_rows!r}")
        if not is_int(self.max_waiting_rows) or self.max_waiting_rows < 1:
            raise ValueError(f"max_waiting_rows must be an integer >= 1, got {self.max_waiting_rows!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> IterativeConfig:
        d = d or {}
        _unknown_keys("iterative user_config", d, cls)
        return cls(**d)


@dataclass(frozen=True)
class ModelEntry:
    """One served model: the name clients use (also its deployment's name) and the store reference."""

    name: str                   # e.g. "gan": the OpenAI `model` field and the Serve deployment name
    ref: str                    # "name", "name@version" or "name@alias" in the store

    @classmethod
    def from_value(cls, value: Any) -> ModelEntry:
        """A bare string "gan@stable" (served as "gan"), or {"name": ..., "ref": ...}."""
        if isinstance(value, str):
            return cls(value.partition("@")[0], value)
        if isinstance(value, dict) and set(value) <= {"name", "ref"} and "name" in value:
            return cls(str(value["name"]), str(value.get("ref") or value["name"]))
        raise ValueError(f"each entry of models must be 'name[@version|alias]' or {{name, ref}}, got {value!r}")


@dataclass(frozen=True)
class AppArgs:
    """The application's `args` in the Serve config."""

    models: tuple[ModelEntry, ...]       # one deployment each
    # The store: a local path or file:// URI; None means $GENSERVE_STORE, else ./model_store_data
    # (relative to the working directory Ray runs replicas in: give an absolute path for `serve deploy`).
    store: str | None = None
    # The longest any call to a model may take (a likelihood over many images, a best_effort request): the
    # proxies' backstop is set past it
    ingress_timeout_s: float = 120.0
    # The SLO of a request that sets none (no latency_slo_ms, X-Request-Timeout-Ms or Triton timeout), at
    # least: max(this, 10x its time on an idle replica) (serving.policy.PolicyConfig). Admitted against and
    # dropped at, like any SLO: past capacity, a request without one is refused rather than queued
    default_slo_ms: float = 3000.0
    # "step": genserve's paths (image-count batching, the step engine); "request": the plain @serve.batch
    # baseline over whole requests (serving/request_batching.py), for the benchmarks
    batching: str = "step"
    # The latency/quality policy's admission control at the ingress (and `model: "auto"`). Off only for
    # the benchmarks' baseline, which stands for a plain Ray Serve app with none.
    admission: bool = True
    # The quality cascade's judge (serving/judge): the classifier `genserve build` publishes as `judge`,
    # "name[@version|alias]" in the store, served as the deployment "judge". None, or a store without it:
    # no cascades (a request asking for one gets a 400 saying so)
    judge: str | None = None

    def __post_init__(self):
        if not self.models:
            raise ValueError("args.models must list at least one model")
        names = [m.name for m in self.models]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"args.models: names must be unique, got {dupes} more than once")
        if not (isinstance(self.ingress_timeout_s, (int, float)) and self.ingress_timeout_s > 0):
            raise ValueError(f"args.ingress_timeout_s must be a number > 0, got {self.ingress_timeout_s!r}")
        if not (isinstance(self.default_slo_ms, (int, float)) and not isinstance(self.default_slo_ms, bool)
                and 0 < self.default_slo_ms <= self.ingress_timeout_s * 1000):
            raise ValueError(f"args.default_slo_ms must be a number > 0 and at most ingress_timeout_s in ms, got "
                             f"{self.default_slo_ms!r}")
        if not isinstance(self.admission, bool):
            raise ValueError(f"args.admission must be true or false, got {self.admission!r}")
        if self.judge is not None and not (isinstance(self.judge, str) and self.judge):
            raise ValueError(f"args.judge must be a store reference such as 'judge@latest', got {self.judge!r}")
        if "judge" in names:
            raise ValueError("args.models: 'judge' is the cascade judge's deployment name; serve the model "
                             "under another name")
        if self.batching not in ("step", "request"):
            raise ValueError(f"args.batching must be 'step' or 'request', got {self.batching!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppArgs:
        d = dict(d or {})
        allowed = {"models", "store", "ingress_timeout_s", "default_slo_ms", "batching", "admission", "judge"}
        if extra := sorted(set(d) - allowed):
            raise ValueError(f"args: unknown keys {extra}; known: {sorted(allowed)}")
        models = d.pop("models", None)
        if not isinstance(models, list):
            raise ValueError(f"args.models must be a list, got {models!r}")
        return cls(models=tuple(ModelEntry.from_value(m) for m in models), **d)
