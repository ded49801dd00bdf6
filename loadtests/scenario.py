"""A load-test scenario: what to send (a weighted mix of request templates), how (protocol, URL) and at
what load (open loop: arrival process over rate stages; closed loop: fixed concurrency), loaded from YAML
and checked up front, so a typo fails before any request is sent.

    name: diffusion-ramp
    protocol: openai                 # openai | kserve_http | kserve_grpc (url: grpc://HOST:9000)
    load:
      arrival: poisson               # open loop; or {concurrency: 4, duration_s: 30} for a closed loop
      ramp: {from: 1, to: 8, steps: 4, stage_s: 15}     # or stages: [{rate: 2, duration_s: 20}, ...]
    warmup_s: 5
    mix:
      - {weight: 2, model: diffusion, prompt: sneaker, steps: 10, latency_slo_ms: 2000}
      - {model: auto, class_id: 3, quality: best}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.checks import is_int, is_number
from core.contracts import NULL_CLASS

PROTOCOLS = ("openai", "kserve_http", "kserve_grpc")
DEFAULT_URLS = {"openai": "http://127.0.0.1:8000", "kserve_http": "http://127.0.0.1:8000",
                "kserve_grpc": "grpc://127.0.0.1:9000"}   # genserve's default ports
ARRIVALS = ("poisson", "constant")
QUALITIES = ("draft", "standard", "best")
NO_CLASS = NULL_CLASS  # the class id that means "unconditional", as the public API documents it


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class Template:
    """One kind of request in the mix. Every field but weight, model, prompt, class_id and n is a genserve
    extra of the request body, sent only when set (None = let the server decide)."""

    weight: float = 1.0                 # relative frequency in the mix
    model: str = "auto"                 # a served model's name, or "auto" (the policy picks)
    prompt: str | None = None           # a Fashion-MNIST class name (OpenAI); None and no class_id: unconditional
    class_id: int | None = None         # 0-9, or 10 = no class; KServe takes only this
    n: int = 1                          # images per request
    sampler: str | None = None          # not checked here: the server's list is the truth, and may grow
    steps: int | None = None
    guidance_scale: float | None = None
    latency_slo_ms: float | None = None  # also the SLO the stats hold this request to
    quality: str | None = None          # a tier: draft | standard | best
    goal: str | None = None
    best_effort: bool | None = None     # with an SLO: serve late rather than be rejected
    cascade: bool | None = None         # one-pass first, diffusion for the images the judge fails
    cascade_threshold: float | None = None  # with cascade: the judge's confidence that skips diffusion

    def __post_init__(self) -> None:
        _check(is_number(self.weight) and self.weight > 0, f"weight must be a number > 0, got {self.weight!r}")
        _check(isinstance(self.model, str) and self.model != "", f"model must be a name or 'auto', got {self.model!r}")
        _check(self.prompt is None or isinstance(self.prompt, str), f"prompt must be a string, got {self.prompt!r}")
        _check(self.class_id is None or is_int(self.class_id) and 0 <= self.class_id <= NO_CLASS,
               f"class_id must be an integer in [0, {NO_CLASS}] ({NO_CLASS} = no class), got {self.class_id!r}")
        _check(is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(self.sampler is None or isinstance(self.sampler, str), f"sampler must be a string, got {self.sampler!r}")
        _check(self.steps is None or is_int(self.steps) and self.steps >= 1,
               f"steps must be an integer >= 1, got {self.steps!r}")
        _check(self.guidance_scale is None or is_number(self.guidance_scale) and self.guidance_scale >= 0,
               f"guidance_scale must be a number >= 0, got {self.guidance_scale!r}")
        _check(self.latency_slo_ms is None or is_number(self.latency_slo_ms) and self.latency_slo_ms > 0,
               f"latency_slo_ms must be a number > 0, got {self.latency_slo_ms!r}")
        _check(self.quality is None or self.quality in QUALITIES,
               f"quality must be one of {', '.join(QUALITIES)}, got {self.quality!r}")
        _check(self.goal is None or isinstance(self.goal, str), f"goal must be a string, got {self.goal!r}")
        _check(self.best_effort is None or isinstance(self.best_effort, bool),
               f"best_effort must be true or false, got {self.best_effort!r}")
        _check(self.cascade is None or isinstance(self.cascade, bool), f"cascade must be true or false, got {self.cascade!r}")
        _check(self.cascade_threshold is None or is_number(self.cascade_threshold) and 0 <= self.cascade_threshold <= 1,
               f"cascade_threshold must be a number in [0, 1], got {self.cascade_threshold!r}")

    def extras(self) -> dict[str, Any]:
        """The set genserve extras (seed aside), in the order declared."""
        core = {"weight", "model", "prompt", "class_id", "n"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in core and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Stage:
    """A stretch of constant offered load."""

    rate: float                         # requests per second offered (0: an idle stretch)
    duration_s: float

    def __post_init__(self) -> None:
        _check(is_number(self.rate) and self.rate >= 0, f"rate must be a number >= 0 (req/s), got {self.rate!r}")
        _check(is_number(self.duration_s) and self.duration_s > 0,
               f"duration_s must be a number > 0, got {self.duration_s!r}")


@dataclass(frozen=True)
class OpenLoop:
    """Requests arrive on a schedule fixed up front, whether or not earlier ones were answered."""

    arrival: str                        # poisson (exponential gaps) | constant (even gaps)
    stages: tuple[Stage, ...]           # played in order; a ramp is several stages

    def __post_init__(self) -> None:
        _check(self.arrival in ARRIVALS, f"arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        _check(len(self.stages) > 0, "stages must list at least one {rate, duration_s}")

    @property
    def duration_s(self) -> float:
        return sum(s.duration_s for s in self.stages)


@dataclass(frozen=True)
class ClosedLoop:
    """`concurrency` users, each sending its next request as soon as its last one is answered."""

    concurrency: int
    duration_s: float

    def __post_init__(self) -> None:
        _check(is_int(self.concurrency) and self.concurrency >= 1,
               f"concurrency must be an integer >= 1, got {self.concurrency!r}")
        _check(is_number(self.duration_s) and self.duration_s > 0,
               f"duration_s must be a number > 0, got {self.duration_s!r}")


@dataclass(frozen=True)
class Scenario:
    name: str
    mix: tuple[Template, ...]
    load: OpenLoop | ClosedLoop
    url: str | None = None              # default: genserve's on this machine, for the protocol (DEFAULT_URLS)
    protocol: str = "openai"
    warmup_s: float = 0.0               # played before the load at its first stage's rate (or concurrency);
                                        # recorded, flagged, and left out of the stats
    max_requests: int | None = None     # stop sending after this many (warm-up included)
    request_timeout_s: float = 60.0     # a request not answered by then is recorded as a timeout
    seed: int = 0                       # fixes the schedule, the mix draws and every request's image seed
    metrics_url: str | None = None      # a Prometheus text endpoint scraped every second during the run
    source: str = field(default="<dict>", compare=False)  # where it was loaded from, for messages

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name != "", f"name must be a non-empty string, got {self.name!r}")
        _check(len(self.mix) > 0, "mix must list at least one request template")
        _check(self.protocol in PROTOCOLS, f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.url is None:
            object.__setattr__(self, "url", DEFAULT_URLS[self.protocol])   # frozen: set once, here
        schemes = ("grpc://",) if self.protocol == "kserve_grpc" else ("http://", "https://")
        _check(isinstance(self.url, str) and self.url.startswith(schemes),
               f"url must start with {' or '.join(schemes)} for protocol {self.protocol}, got {self.url!r}")
        if self.protocol != "openai":
            for i, t in enumerate(self.mix):
                _check(t.prompt is None and t.class_id is not None,
                       f"mix[{i}]: KServe v2 takes class_id (0-9, {NO_CLASS} = no class), not prompt")
        _check(is_number(self.warmup_s) and self.warmup_s >= 0, f"warmup_s must be a number >= 0, got {self.warmup_s!r}")
        _check(self.max_requests is None or is_int(self.max_requests) and self.max_requests >= 1,
               f"max_requests must be an integer >= 1, got {self.max_requests!r}")
        _check(is_number(self.request_timeout_s) and self.request_timeout_s > 0,
               f"request_timeout_s must be a number > 0, got {self.request_timeout_s!r}")
        _check(is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        _check(self.metrics_url is None or isinstance(self.metrics_url, str),
               f"metrics_url must be a URL, got {self.metrics_url!r}")

    @property
    def duration_s(self) -> float:
        """Warm-up plus load: when the last request is sent, at the latest."""
        return self.warmup_s + self.load.duration_s

    def to_dict(self) -> dict[str, Any]:
        """The effective scenario (with overrides applied), as recorded in run.json."""
        data = dataclasses.asdict(self)
        del data["source"]
        data["mix"] = [{k: v for k, v in t.items() if v is not None} for t in data["mix"]]
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Scenario:
        """Raises ValueError naming the source and where the fault is (`scenario s.yaml: mix[2]: steps must ...`)."""
        try:
            data = dict(_mapping(data, "the scenario"))
            if missing := [k for k in ("name", "mix", "load") if k not in data]:
                raise ValueError(f"missing {missing[0]!r}")
            mix = _list(data.pop("mix"), "mix")
            data["mix"] = tuple(_build(Template, t, f"mix[{i}]") for i, t in enumerate(mix))
            data["load"] = _load(data.pop("load"))
            return _build(cls, data, None, source=source)
        except ValueError as exc:
            raise ValueError(f"scenario {source}: {exc}") from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"scenario {path}: not valid YAML: {exc}") from None
    return Scenario.from_dict(data, source=str(path))


def _mapping(data: Any, where: str) -> dict[str, Any]:
    _check(isinstance(data, dict), f"{where} must be a mapping, got {type(data).__name__}")
    return data


def _list(data: Any, where: str) -> list[Any]:
    _check(isinstance(data, list), f"{where} must be a list, got {type(data).__name__}")
    return data


def _build(cls: type, data: Any, where: str | None, **fixed: Any) -> Any:
    """cls(**data, **fixed), with unknown or missing keys and cls's own checks reported at `where`; `fixed`
    are fields the loader sets, not the file."""
    prefix = f"{where}: " if where else ""
    data = _mapping(data, where or "the scenario")
    fields = [f for f in dataclasses.fields(cls) if f.name not in fixed]
    names = [f.name for f in fields]
    if unknown := sorted(set(data) - set(names)):
        raise ValueError(f"{prefix}unknown key {unknown[0]!r}; expected {', '.join(names)}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing := [n for n in required if n not in data]:
        raise ValueError(f"{prefix}missing {missing[0]!r}")
    try:
        return cls(**data, **fixed)
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None


def _load(data: Any) -> OpenLoop | ClosedLoop:
    data = _mapping(data, "load")
    if "concurrency" in data:
        return _build(ClosedLoop, data, "load")
    open_keys = {"arrival", "stages", "ramp"}
    if unknown := sorted(set(data) - open_keys):
        raise ValueError(f"load: unknown key {unknown[0]!r}; expected arrival with stages or ramp (open loop), "
                         "or concurrency with duration_s (closed loop)")
    _check(("stages" in data) != ("ramp" in data), "load: give exactly one of stages or ramp")
    if "ramp" in data:
        stages = _ramp(_mapping(data["ramp"], "load.ramp"))
    else:
        stages = tuple(_build(Stage, s, f"load.stages[{i}]") for i, s in enumerate(_list(data["stages"], "load.stages")))
    return _build(OpenLoop, {"arrival": data.get("arrival"), "stages": stages}, "load")


def _ramp(ramp: dict[str, Any]) -> tuple[Stage, ...]:
    """{from, to, steps, stage_s} -> `steps` stages of stage_s seconds, rates evenly from `from` to `to`."""
    keys = ("from", "to", "steps", "stage_s")
    if unknown := sorted(set(ramp) - set(keys)):
        raise ValueError(f"load.ramp: unknown key {unknown[0]!r}; expected {', '.join(keys)}")
    if missing := [k for k in keys if k not in ramp]:
        raise ValueError(f"load.ramp: missing {missing[0]!r}")
    lo, hi, steps, stage_s = (ramp[k] for k in keys)
    _check(is_int(steps) and steps >= 2, f"load.ramp: steps must be an integer >= 2, got {steps!r}")
    _check(is_number(lo) and is_number(hi), f"load.ramp: from and to must be numbers, got {lo!r}, {hi!r}")
    _check(is_number(stage_s) and stage_s > 0, f"load.ramp: stage_s must be a number > 0, got {stage_s!r}")
    try:
        return tuple(Stage(lo + (hi - lo) * i / (steps - 1), stage_s) for i in range(steps))
    except ValueError as exc:
        raise ValueError(f"load.ramp: {exc}") from None
