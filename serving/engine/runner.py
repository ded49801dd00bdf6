"""Runners: the one forward pass per engine step. The engine sees only these protocols; an ONNX Runtime
session over a store-verified graph serves, a torch callable stands in for tests and offline work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from core.contracts import GraphContract
from core.runtime import ProviderChoice, make_session
from model_store.store import LoadedVersion, ModelStore


class DenoiseRunner(Protocol):
    def execute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Called once per diffusion engine step, off the event loop, with every scheduled row:
        x [R, 1, 28, 28] float32, t [R] int64 per-row timestep, y [R] int64 class (NULL_CLASS for
        unconditional rows) -> eps [R, 1, 28, 28] float32. Row i of the output depends on row i only."""
        ...


class StepRunner(Protocol):
    def execute(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Called once per PixelCNN engine step, off the event loop: x [R, 1, 28, 28] float32 levels
        0..255, y [R] int64 class, p [R] int64 raster position -> mixture parameters [R, 3K] float32 of pixel p of
        each row. Row i of the output depends on row i only."""
        ...


class OnnxRunner:
    """An ONNX Runtime session fed in its contract's input order; serves both protocols."""

    def __init__(self, session, contract: GraphContract):
        self.session, self.contract = session, contract
        self._inputs = [(spec.name, np.dtype(spec.dtype)) for spec in contract.inputs]
        self._outputs = [contract.outputs[0].name]

    @classmethod
    def from_version(cls, loaded: LoadedVersion, graph: str, *, threads: int | None = None,
                     choice: ProviderChoice | None = None) -> OnnxRunner:
        """A session over the verified bytes of one graph ("denoise", "step"): runs at replica start."""
        contract = loaded.manifest.graph(graph)
        return cls(make_session(loaded.graph_bytes(graph), threads=threads, choice=choice), contract)

    @classmethod
    def from_store(cls, store: ModelStore, ref: str, graph: str, **kwargs) -> OnnxRunner:
        """Load name@version or name@alias (hashes verified), then as from_version."""
        return cls.from_version(store.load(ref), graph, **kwargs)

    def execute(self, *inputs: torch.Tensor) -> torch.Tensor:
        feeds = {name: np.ascontiguousarray(t.numpy(), dtype=dtype) for (name, dtype), t in zip(self._inputs, inputs)}
        return torch.from_numpy(self.session.run(self._outputs, feeds)[0])


class TorchRunner:
    """Any torch callable with the graph's signature (a families module, a toy denoiser), under no_grad."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn

    @torch.no_grad()
    def execute(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(*inputs).float()
