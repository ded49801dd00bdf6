"""Where store bytes live. ModelStore owns the layout, hashing and verification; a backend only moves
bytes, and provides the two atomic operations the store's guarantees rest on: commit a whole folder at
once (or fail if it exists), and replace one small file at once."""
from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from model_store.errors import StoreError, VersionExists

STAGING = ".staging"   # publishes in progress; never visible as versions (names starting with "." are not valid models)
TRASH = ".trash"       # folders being deleted: renamed here first so they vanish at once


@dataclass(frozen=True)
class Entry:
    """One thing found under a version folder, as it is on storage (never following links)."""

    path: str                                   # relative to the version folder, '/'-separated
    kind: Literal["file", "dir", "symlink", "other"]
    target: str | None = None                   # symlinks: where it points
    escapes: bool = False                       # symlinks: resolves outside the version folder


class StoreBackend(Protocol):
    """Storage under one root. Keys are '/'-separated paths relative to the root, already validated by
    the store (no '..', not absolute)."""

    uri: str

    def list_dir(self, key: str) -> list[str]:
        """Names directly under key, [] when it does not exist. Called by ls, resolve and gc."""
        ...

    def exists(self, key: str) -> bool:
        """Called before publishing and when resolving a reference."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """One file, never through a symlink. Called by load/verify for every file of a version."""
        ...

    def walk(self, key: str) -> list[Entry]:
        """Everything under a version folder, links reported and not followed. Called by load/verify
        before any file is trusted."""
        ...

    def commit_dir(self, key: str, files: dict[str, bytes]) -> None:
        """Make a folder holding exactly `files` appear at key all at once, durably; raise VersionExists
        when key already exists (also when another writer wins a race). Called once per publish."""
        ...

    def replace_bytes(self, key: str, data: bytes) -> None:
        """Create or overwrite one small file atomically: readers see the old or the new, never a mix.
        Called to move aliases."""
        ...

    def remove(self, key: str) -> None:
        """Delete a file or folder so that it disappears at once. Called by gc and alias deletion."""
        ...

    def cleanup(self, older_than_s: float) -> list[str]:
        """Drop leftovers of crashed publishes/deletes older than older_than_s. Called by gc."""
        ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class LocalBackend:
    """A folder on a local (POSIX) filesystem. Atomicity comes from rename(2) within one filesystem, which
    is why staging lives inside the store root."""

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if PurePosixPath(key).is_absolute() or ".." in parts:
            raise StoreError(f"refusing store key {key!r}: it escapes the store")
        return self.root.joinpath(*parts)

    def list_dir(self, key: str) -> list[str]:
        path = self._path(key)
        return sorted(os.listdir(path)) if path.is_dir() else []

    def exists(self, key: str) -> bool:
        return os.path.lexists(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def walk(self, key: str) -> list[Entry]:
        top = self._path(key)
        if top.is_symlink():
            return [Entry(".", "symlink", os.readlink(top), True)]
        real_top = top.resolve()
        entries: list[Entry] = []
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            for name in sorted(dirnames + filenames):
                full = Path(dirpath, name)
                rel = full.relative_to(top).as_posix()
                if full.is_symlink():
                    real = full.resolve()
                    escapes = real != real_top and real_top not in real.parents
                    entries.append(Entry(rel, "symlink", os.readlink(full), escapes))
                elif full.is_dir():
                    entries.append(Entry(rel, "dir"))
                elif full.is_file():
                    entries.append(Entry(rel, "file"))
                else:
                    entries.append(Entry(rel, "other"))
        return entries

    def commit_dir(self, key: str, files: dict[str, bytes]) -> None:
        target = self._path(key)
        staging = self._stage(files)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._promote(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(target.parent)

    def _stage(self, files: dict[str, bytes]) -> Path:
        """Write every file under a fresh staging folder and fsync it all; invisible to readers."""
        staging = self.root / STAGING / uuid.uuid4().hex
        staging.mkdir(parents=True)
        try:
            for rel, data in files.items():
                path = staging.joinpath(*PurePosixPath(rel).parts)
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_durable(path, data)
            for dirpath, _, _ in os.walk(staging):
                _fsync_dir(Path(dirpath))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _promote(self, staging: Path, target: Path) -> None:
        """rename(2) onto an existing non-empty folder fails (ENOTEMPTY/EEXIST): of two racing publishes of
        one version, exactly one lands. A version folder is never empty: it always holds manifest.json."""
        try:
            os.rename(staging, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or target.exists():
                raise VersionExists(f"{target.relative_to(self.root).as_posix()} already exists; versions are immutable") from exc
            raise

    def replace_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            _write_durable(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def remove(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():
            trash = self.root / TRASH / uuid.uuid4().hex
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, trash)          # gone for readers at once; deleting the files can take a while
            _fsync_dir(path.parent)
            shutil.rmtree(trash)
        else:
            path.unlink(missing_ok=True)

    def cleanup(self, older_than_s: float) -> list[str]:
        removed = []
        now = time.time()
        for area in (STAGING, TRASH):
            for name in self.list_dir(area):
                path = self.root / area / name
                if now - path.stat().st_mtime >= older_than_s:  # younger ones may be a publish in progress
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(f"{area}/{name}")
        return removed
