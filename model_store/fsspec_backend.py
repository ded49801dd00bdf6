"""Object stores (s3://, gs://, az://, memory://, ...) through fsspec.

Object stores have no atomic directory rename, so a version is published differently from the local
backend: every artifact is uploaded under <model>/<version>/ first, then manifest.json LAST with a
put-if-absent. The store treats a version as existing only when its manifest.json does (readers, `ls` and
resolve ignore manifest-less folders), so a publish that dies mid-upload never leaves a visible version;
`gc` (cleanup) removes such leftovers once they are older than the stale age. Aliases are single small
objects overwritten whole: an object PUT is atomic per object, so readers see the old or the new."""
from __future__ import annotations

import time
from datetime import datetime
from pathlib import PurePosixPath

from model_store.backend import Entry
from model_store.errors import StoreError, VersionExists
from model_store.manifest import MANIFEST_FILE


def _import_fsspec():
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a dependency
        raise StoreError("object-store model stores need fsspec: pip install fsspec") from exc
    return fsspec


class FsspecBackend:
    """Storage under one prefix of an fsspec filesystem (`fsspec.filesystem(protocol, **options)`)."""

    def __init__(self, uri: str, **options):
        fsspec = _import_fsspec()
        protocol = uri.split("://", 1)[0]
        try:
            fs_cls = fsspec.get_filesystem_class(protocol)
        except ValueError as exc:
            raise StoreError(f"unknown model store URI scheme {protocol}:// in {uri!r}: use a local path, "
                             f"file://, or an fsspec protocol (s3://, gs://, memory://, ...)") from exc
        except ImportError as exc:
            raise StoreError(f"model store {uri!r} needs the fsspec implementation for {protocol}:// "
                             f"({exc})") from exc
        self.fs = fsspec.filesystem(protocol, **options)
        self.protocol = protocol
        self.root = fs_cls._strip_protocol(uri).rstrip("/")
        self.uri = uri.rstrip("/")

    # ---- keys ----------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        p = PurePosixPath(key)
        if p.is_absolute() or ".." in p.parts or "\\" in key:
            raise StoreError(f"refusing store key {key!r}: it escapes the store")
        rel = "/".join(part for part in p.parts if part not in ("", "."))
        return f"{self.root}/{rel}" if rel else self.root

    def _rel(self, full: str, top: str) -> str:
        full = self.fs._strip_protocol(full).rstrip("/")
        return full[len(top):].lstrip("/")

    # ---- reading -------------------------------------------------------------------------------

    def list_dir(self, key: str) -> list[str]:
        path = self._path(key)
        try:
            self.fs.invalidate_cache(path)  # caching filesystems (s3fs, gcsfs) would list stale entries
            names = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = {PurePosixPath(self.fs._strip_protocol(n).rstrip("/")).name for n in names}
        out.discard("")
        return sorted(out)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def read_bytes(self, key: str) -> bytes:
        # Object stores have no symlinks: the bytes are the object's, read once; the store hashes exactly them.
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            raise
        except IsADirectoryError as exc:
            raise FileNotFoundError(key) from exc

    def walk(self, key: str) -> list[Entry]:
        top = self._path(key)
        try:
            found = self.fs.find(top, withdirs=True, detail=True)
        except FileNotFoundError:
            return []
        entries = []
        for name, info in sorted(found.items()):
            rel = self._rel(name, top)
            if not rel:
                continue
            kind = info.get("type")
            entries.append(Entry(rel, "file" if kind == "file" else "dir" if kind == "directory" else "other"))
        return entries

    # ---- writing -------------------------------------------------------------------------------

    def commit_dir(self, key: str, files: dict[str, bytes]) -> None:
        """Upload every file, then manifest.json last with a put-if-absent. Without a conditional put on the
        filesystem, the manifest write falls back to check-then-put, and two racing publishes of one version
        can both 'win' in the window between the check and the put (last manifest wins; a loser's artifacts
        may also overwrite the winner's, which load's hash check then refuses). Versions are derived from
        content hashes, so racing publishers normally upload identical bytes."""
        if MANIFEST_FILE not in files:
            raise StoreError(f"commit_dir needs a {MANIFEST_FILE}: it is what makes a version visible")
        manifest_key = f"{key}/{MANIFEST_FILE}"
        if self.exists(manifest_key):
            raise VersionExists(f"{key} already exists; versions are immutable")
        stale = [e.path for e in self.walk(key) if e.kind == "file" and e.path not in files]
        for rel in stale:           # leftovers of a crashed publish would otherwise be 'files not in the manifest'
            self.fs.rm_file(self._path(f"{key}/{rel}"))
        for rel, data in files.items():
            if rel != MANIFEST_FILE:
                self.fs.pipe_file(self._path(f"{key}/{rel}"), data)
        self._put_if_absent(manifest_key, files[MANIFEST_FILE], key)

    def _put_if_absent(self, key: str, data: bytes, what: str) -> None:
        path = self._path(key)
        try:
            # fsspec >= 2024.12: mode="create" is a conditional put (If-None-Match) where the filesystem
            # offers one (s3fs, gcsfs, memory); elsewhere fsspec itself checks existence first (racy).
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError as exc:
            raise VersionExists(f"{what} already exists; versions are immutable") from exc
        except TypeError:
            # Older fsspec without mode=: check then put. A race window exists here: without a
            # conditional put, a concurrent publisher can write its manifest between our check and put.
            if self.fs.exists(path):
                raise VersionExists(f"{what} already exists; versions are immutable") from None
            self.fs.pipe_file(path, data)

    def replace_bytes(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)   # one PUT of the whole object: atomic per object

    def remove(self, key: str) -> None:
        path = self._path(key)
        if not self.fs.exists(path):
            return
        if self.fs.isdir(path):
            manifest = f"{path}/{MANIFEST_FILE}"
            if self.fs.exists(manifest):
                self.fs.rm_file(manifest)          # the version vanishes for readers at once
            self.fs.rm(path, recursive=True)
        else:
            self.fs.rm_file(path)

    def cleanup(self, older_than_s: float) -> list[str]:
        """Remove <model>/<version>/ folders without manifest.json (crashed publishes) whose newest object is
        older than older_than_s: younger ones may be an upload still in progress."""
        removed = []
        now = time.time()
        for model in self.list_dir(""):
            if model.startswith("."):
                continue
            for version in self.list_dir(model):
                key = f"{model}/{version}"
                if version.startswith(".") or self.exists(f"{key}/{MANIFEST_FILE}") or not self.fs.isdir(self._path(key)):
                    continue
                age = self._age_s(key, now)
                if older_than_s <= 0 or (age is not None and age >= older_than_s):
                    self.fs.rm(self._path(key), recursive=True)
                    removed.append(key)
        return removed

    def _age_s(self, key: str, now: float) -> float | None:
        """Seconds since the newest object under key was written; None when the filesystem cannot say."""
        newest = None
        for e in self.walk(key):
            if e.kind != "file":
                continue
            try:
                stamp = self.fs.modified(self._path(f"{key}/{e.path}"))
            except (NotImplementedError, OSError, ValueError):
                return None
            ts = stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)
            newest = ts if newest is None else max(newest, ts)
        return None if newest is None else now - newest

