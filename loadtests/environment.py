"""Where a run ran: the client machine and the versions that matter, for run.json and the report. Reads
package versions from their metadata, so nothing heavy is imported."""
from __future__ import annotations

import os
import platform
import socket
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PACKAGES = ("genserve", "ray", "onnxruntime", "torch", "aiohttp", "numpy")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def describe_machine() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version(),
            "packages": {p: v for p in PACKAGES if (v := _version(p))}}
