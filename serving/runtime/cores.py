"""A node's cores, shared by demand among the model replicas on it.

Ray reserves one CPU per model replica, and ONNX Runtime sized to that reservation runs one intra-op thread:
on a 2-core machine serving five models, a busy diffusion replica then uses one core while the other sits
idle with the idle models. Sizing every session to the whole node instead makes things worse whenever two
models are busy at once (their spinning thread pools fight: two diffusion forwards side by side lost 23% of
their throughput here). So each replica keeps two sessions per graph, narrow (its reservation) and wide
(the node's cores), and runs a forward on the wide one only while no other replica on the node is busy.

Replicas tell each other through one small shared-memory file per Ray node (/dev/shm, keyed by the node id):
a slot per replica holding its pid and until when it counts as busy. A forward marks its slot busy until
it ends plus HOLD_S, so a replica stepping a batch back to back stays busy across the gaps between its
forwards, and an idle one is free again a few milliseconds after its last one. Reads and writes are single
aligned 8-byte stores, no locks on the hot path; two replicas that both see the node free at the same
instant share it for one forward, which is the old behaviour, not an error.

Off by default, on with GENSERVE_SHARE_CORES=1: measured here (`python -m benchmarks.serving machine`,
2026-11-30), it did not pay. Diffusion's capacity was set by the per-request path, not the UNet (a minimal
step loop served the same 24 req/s with one ORT thread as with two), and with all five models under load
at once every model's latency rose (diffusion p50 96 vs 76 ms): a wide forward's spinning threads linger
into the next model's forward. Kept for nodes where one model does dominate the cores.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SLOTS = 128             # replicas per node that can share; more run narrow (never wrong, only slower)
HOLD_S = 0.02           # busy this long after a forward: covers an engine's gap between two steps
LONG_S = 10.0           # busy at most this long into a forward, in case its process dies in it
SHARE_ENV = "GENSERVE_SHARE_CORES"
PREFIX = "genserve-cores-"  # + the Ray node id: one table per node (a Ray restart is a new node)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a Kubernetes CPU
    limit), which os.cpu_count() does not see."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def sharing_enabled() -> bool:
    return os.environ.get(SHARE_ENV, "0") in ("1", "true", "yes")


class NodeCores:
    """This replica's slot in its node's table. `busy()` wraps every forward; `alone()` says whether the
    wide session may run it."""

    def __init__(self, node_id: str, directory: str = "/dev/shm"):
        path = Path(directory) / f"{PREFIX}{node_id}"
        _remove_tables_of_gone_nodes(Path(directory), keep=path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one claimer at a time: two replicas never take the same slot
            if os.fstat(fd).st_size < SLOTS * 16:
                os.ftruncate(fd, SLOTS * 16)
            self._map = mmap.mmap(fd, SLOTS * 16)
            table = np.ndarray((SLOTS, 2), dtype=np.float64, buffer=self._map)  # [pid, busy_until] per slot
            self.pids, self.until = table[:, 0], table[:, 1]
            self.slot = self._claim()
            if self.slot is not None:
                self.pids[self.slot], self.until[self.slot] = os.getpid(), 0.0
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _claim(self) -> int | None:
        """A free slot: never used, or left by a process that is gone (a replica that died or was replaced)."""
        for slot, pid in enumerate(self.pids):
            if pid == 0 or not _alive(int(pid)):
                return slot
        return None

    def alone(self) -> bool:
        """No other replica on this node is in a forward or was within HOLD_S."""
        if self.slot is None:
            return False
        now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the host
        others = np.flatnonzero(self.until > now)
        return len(others) == 0 or (len(others) == 1 and others[0] == self.slot)

    @contextmanager
    def busy(self):
        if self.slot is None:
            yield
            return
        self.until[self.slot] = time.monotonic() + LONG_S
        try:
            yield
        finally:
            self.until[self.slot] = time.monotonic() + HOLD_S


def _remove_tables_of_gone_nodes(directory: Path, keep: Path) -> None:
    """The tables of Ray nodes that ended (every replica that used one is gone) are removed by the next
    replica to start, so /dev/shm does not fill with one 2 KB file per Ray start."""
    for path in directory.glob(f"{PREFIX}*"):
        if path == keep:
            continue
        try:
            pids = np.fromfile(path, dtype=np.float64)[::2]
        except OSError:
            continue
        if pids.any() and not any(_alive(int(pid)) for pid in pids if pid):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
