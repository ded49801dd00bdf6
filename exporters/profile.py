"""Timing: per-forward latency of a graph at several batch sizes, and a description of the machine that
measured it (a latency profile means nothing without the machine and its load at the time)."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


def time_call(fn: Callable[[], object], *, warmup: int = 1, min_runs: int = 3, max_runs: int = 20,
              budget_s: float = 1.0) -> float:
    """Median milliseconds per call: at least min_runs, more while within budget_s (the median of a few
    runs resists the odd slow one from a busy machine)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (len(times) < max_runs and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def batch_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch, with max_batch itself last even when not a power of two."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


@dataclass
class MachineInfo:
    hostname: str
    platform: str              # OS and architecture
    cpu: str                   # CPU model name
    cpu_count: int
    load_average: tuple[float, float, float] | None  # at measurement time: a busy machine inflates latencies
    onnxruntime: str
    numpy: str

    def to_dict(self) -> dict:
        return asdict(self)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> MachineInfo:
    import onnxruntime as ort

    load = tuple(round(v, 2) for v in os.getloadavg()) if hasattr(os, "getloadavg") else None
    return MachineInfo(platform.node(), platform.platform(), _cpu_model(), os.cpu_count() or 0, load,
                       ort.__version__, np.__version__)


def measure_latency(session, contract, batches: list[int], *, budget_s: float = 0.3,
                    seed: int = 0) -> dict[int, float]:
    """Median ms per forward of an ONNX Runtime session at each batch size, on in-domain random inputs."""
    from core.contracts import sample_inputs

    rng = np.random.default_rng(seed)
    result = {}
    for batch in batches:
        feeds = sample_inputs(contract, batch, rng)
        result[batch] = round(time_call(lambda: session.run(None, feeds), budget_s=budget_s), 4)
    return result
