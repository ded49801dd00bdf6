"""A node-local, content-addressed cache of verified store files, so that a second replica on the same node
loads a version without downloading its artifacts again.

Layout: `$GENSERVE_CACHE_DIR` (default `$XDG_CACHE_HOME/genserve/blobs`, i.e. `~/.cache/genserve/blobs`)
holds one file per blob, named by the sha256 of its content; nothing else but `.tmp-*` files being written.

- **Only verified bytes go in.** `put` hashes the bytes itself and refuses any whose sha256 is not the name
  they would be stored under, so a tampered or corrupted object can never enter the cache, whatever the
  caller does. The store only calls `put` after a whole version has verified against its manifest.
- **Atomic writes.** A blob is written to a unique temp file in the cache folder, fsynced, then renamed
  onto `<sha256>` (`os.replace`): readers see the whole file or none. Two replicas racing on one blob
  both write identical bytes and the last rename wins; neither sees a partial file.
- **Re-hashed on every use.** `get` reads the file and hashes exactly the bytes it returns (sha256 runs
  at ~1 GB/s on this machine's CPU, so ~1-5 ms for the shipped graphs, next to tens of ms to create
  an ONNX Runtime session from them). A per-process "hashed once" memo would save those milliseconds
  but trust a file any local process could have replaced since; hashing the served bytes leaves no
  window between the check and the use. A cached file that fails is deleted and counted as `corrupt`,
  and the caller downloads again.
- **Never fatal.** A cache that cannot be written (disk full, read-only) logs a warning and the load
  goes on from the store.

Not done: eviction. The cache grows with every version loaded on the node; blobs are immutable and
shared between versions with identical files, and deleting any of them (or the whole folder) is always
safe: the next load downloads them again."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_ENV = "GENSERVE_CACHE_DIR"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TMP_PREFIX = ".tmp-"


def default_cache_dir() -> Path:
    """$GENSERVE_CACHE_DIR, else $XDG_CACHE_HOME/genserve/blobs, else ~/.cache/genserve/blobs."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "genserve" / "blobs"


@dataclass
class CacheStats:
    """What this process's cache did: a hit means the blob was NOT read from the store."""

    hits: int = 0           # served from the cache, hash verified
    misses: int = 0         # not there (or corrupt): the caller downloads it
    stored: int = 0         # written after verification
    corrupt: int = 0        # a cached file failed its hash and was deleted
    write_errors: int = 0   # could not write (the load went on without caching)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class BlobCache:
    """Verified blobs under one local folder, by sha256. Safe to share between processes."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root if root is not None else default_cache_dir()).expanduser().absolute()
        self.stats = CacheStats()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BlobCache({str(self.root)!r})"

    def path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self.stats, field, getattr(self.stats, field) + 1)

    def get(self, sha256: str, size: int) -> bytes | None:
        """The blob's bytes if cached and they still hash to sha256 (and have `size` bytes), else None."""
        path = self.path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._count("misses")
            return None
        except OSError as exc:      # a symlink planted there (ELOOP), permissions, I/O error: not trusted
            log.warning("blob cache: cannot read %s (%s); fetching it from the store", path, exc)
            self._count("misses")
            return None
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            log.warning("blob cache: %s does not match its name (%d bytes, want %d); deleting it and fetching "
                        "it from the store", path, len(data), size)
            self._count("corrupt")
            self._count("misses")
            try:
                path.unlink()
            except OSError:
                pass
            return None
        self._count("hits")
        return data

    def put(self, sha256: str, data: bytes) -> Path | None:
        """Store verified bytes as <sha256>, atomically. Raises ValueError if data does not hash to sha256
        (never caches unverified bytes); returns None (and logs) if the cache cannot be written."""
        path = self.path(sha256)
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise ValueError(f"refusing to cache bytes with sha256 {actual} under {sha256}")
        tmp = self.root / f"{TMP_PREFIX}{sha256[:16]}-{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)      # atomic; a racing writer of the same blob wrote the same bytes
        except OSError as exc:
            log.warning("blob cache: cannot write %s (%s); serving without caching it", path, exc)
            self._count("write_errors")
            try:
                tmp.unlink()
            except OSError:
                pass
            return None
        self._count("stored")
        return path

    def __contains__(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def blobs(self) -> list[str]:
        """The sha256 of every blob present (temp files of writes in flight excluded)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if _SHA256.match(n))
