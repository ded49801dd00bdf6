"""manifest.json: everything serving needs to know about one model version without opening its graphs."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from core.contracts import GraphContract
from core.settings import Quality, SamplingSetting

SCHEMA = 1
MANIFEST_FILE = "manifest.json"


@dataclass
class FileEntry:
    sha256: str
    size: int                  # bytes; checked before hashing, so a truncated file fails fast


@dataclass
class SamplingSettings:
    """What the policy may choose for this model: `allowed` are the candidates (each a full setting),
    `default` is used when a request names none."""

    default: SamplingSetting = field(default_factory=SamplingSetting)   # e.g. dpmpp_2m, 10 steps, guidance 2
    allowed: list[SamplingSetting] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default.to_dict(), "allowed": [s.to_dict() for s in self.allowed]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingSettings:
        return cls(SamplingSetting.from_dict(d.get("default")), [SamplingSetting.from_dict(s) for s in d.get("allowed", [])])


@dataclass
class SourceCheckpoint:
    sha256: str                # sha256 over (weights hash, card hash): identifies the checkpoint
    weights_sha256: str
    card_sha256: str
    path: str                  # where it was published from, for humans
    config: dict[str, Any]     # the family config the graphs were built with
    training_steps: int | None = None


def _batch_keys_to_json(table: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    """graph -> batch -> value, with the batch keys as strings: JSON objects only have string keys."""
    return {g: {str(b): v for b, v in row.items()} for g, row in table.items()}


def _batch_keys_from_json(table: dict[str, dict[str, float]]) -> dict[str, dict[int, float]]:
    return {g: {int(b): float(v) for b, v in row.items()} for g, row in table.items()}


@dataclass
class LatencyProfile:
    """Median ms per forward pass of each graph, per batch size, measured at publish on `machine`."""

    machine: dict[str, Any]                    # exporters.profile.MachineInfo as a dict
    provider: str                              # ONNX Runtime execution provider used
    provider_reason: str
    threads: int | None                        # intra-op threads (None: ONNX Runtime's default)
    measured_at: str                           # ISO 8601 UTC
    ms_per_forward: dict[str, dict[int, float]]  # graph -> batch -> ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ms_per_forward": _batch_keys_to_json(self.ms_per_forward)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyProfile:
        return cls(**{**d, "ms_per_forward": _batch_keys_from_json(d["ms_per_forward"])})


@dataclass
class ExportInfo:
    opset: int
    tools: dict[str, str]                      # package -> version (torch, onnx, onnxruntime)
    parity_atol: float
    parity: dict[str, dict[int, float]]        # graph -> batch -> max abs error, ORT vs torch
    optimization: dict[str, dict[str, Any]]    # graph -> exporters.onnx_export.OptimizationReport as a dict

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "parity": _batch_keys_to_json(self.parity)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportInfo:
        return cls(**{**d, "parity": _batch_keys_from_json(d["parity"])})


@dataclass
class Manifest:
    model: str                                 # store name, e.g. "diffusion"
    version: str
    family: str                                # gan | vae | flow | pixelcnn | diffusion
    created_at: str                            # ISO 8601 UTC
    graphs: list[GraphContract]
    sampling: SamplingSettings
    metrics: dict[str, Any]                    # the model card's metrics from `genserve evaluate`, as-is
    source: SourceCheckpoint | None = None
    latency: LatencyProfile | None = None
    export: ExportInfo | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)  # every file of the version but this one; the store fills it
    schema: int = SCHEMA

    def quality(self, setting: SamplingSetting) -> Quality | None:
        """What `genserve evaluate` measured for exactly this setting; None when it never was."""
        return Quality.measured(self.metrics, setting, is_default=setting == self.sampling.default)

    def graph(self, name: str) -> GraphContract:
        for g in self.graphs:
            if g.graph == name:
                return g
        raise KeyError(f"{self.model}@{self.version} has no graph {name!r}; it has {[g.graph for g in self.graphs]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "model": self.model, "version": self.version, "family": self.family,
            "created_at": self.created_at, "graphs": [g.to_dict() for g in self.graphs],
            "sampling": self.sampling.to_dict(), "metrics": self.metrics,
            "source": asdict(self.source) if self.source else None,
            "latency": self.latency.to_dict() if self.latency else None,
            "export": self.export.to_dict() if self.export else None,
            "files": {k: asdict(v) for k, v in sorted(self.files.items())},
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("schema") != SCHEMA:
            raise ValueError(f"manifest schema {d.get('schema')!r} is not supported (expected {SCHEMA})")
        return cls(
            model=d["model"], version=d["version"], family=d["family"], created_at=d["created_at"],
            graphs=[GraphContract.from_dict(g) for g in d["graphs"]],
            sampling=SamplingSettings.from_dict(d["sampling"]), metrics=d.get("metrics") or {},
            source=SourceCheckpoint(**d["source"]) if d.get("source") else None,
            latency=LatencyProfile.from_dict(d["latency"]) if d.get("latency") else None,
            export=ExportInfo.from_dict(d["export"]) if d.get("export") else None,
            files={k: FileEntry(**v) for k, v in d.get("files", {}).items()}, schema=d["schema"])

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        return cls.from_dict(json.loads(data))
