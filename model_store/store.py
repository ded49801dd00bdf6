"""The model store: immutable versions with verified artifacts, and movable aliases.

Layout under the root (local path, or an object-store prefix through fsspec):

    <model>/<version>/manifest.json      what the version is, and the sha256 of every other file
    <model>/<version>/<graph>.onnx ...   the artifacts
    <model>/.aliases/<alias>             {"version": ...}: latest, stable, or any name
    .staging/ .trash/                    in-flight publishes and deletes, never visible as versions

Stores on an object store (s3://, gs://, ...) get a node-local cache of verified files by sha256
(model_store/cache.py): a second load on the same node reads the version's manifest and alias from the
store (they move), and its artifacts from local disk, re-hashed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from model_store.backend import LocalBackend, StoreBackend
from model_store.cache import BlobCache
from model_store.fsspec_backend import FsspecBackend
from model_store.errors import IntegrityError, NotFound, StoreError, VersionExists
from model_store.manifest import MANIFEST_FILE, FileEntry, Manifest

DEFAULT_STORE = "./model_store_data"
STORE_ENV = "GENSERVE_STORE"
DEFAULT_ALIAS = "latest"
ALIASES = ".aliases"
STALE_STAGING_S = 3600.0     # gc leaves younger leftovers alone: they may be a publish still running
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # no '/', no leading '.', so never '..'

log = logging.getLogger(__name__)


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_', '-', starting with a "
                         "letter or digit (at most 128)")
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_store_uri() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE



def open_backend(uri: str | os.PathLike, **storage_options) -> StoreBackend:
    """A local path or file:// URI -> LocalBackend; any other scheme (s3://, gs://, memory://, ...) ->
    FsspecBackend (`fsspec.filesystem(protocol, **storage_options)`), whose commit_dir uploads the files,
    then manifest.json last with a put-if-absent."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # one letter: a Windows drive, a path
        path = parsed.path if parsed.scheme == "file" else text
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StoreError(f"file:// URI with a host is not supported: {text}")
        return LocalBackend(Path(path))
    return FsspecBackend(text, **storage_options)


@dataclass
class LoadedVersion:
    """A verified version: its manifest and the bytes of every file, read once and checked, so what
    serving runs is exactly what was hashed (no re-read between verification and use)."""

    manifest: Manifest
    files: dict[str, bytes]      # relative path -> verified content
    from_cache: frozenset[str] = frozenset()   # the files read from the local blob cache, not the store

    def graph_bytes(self, graph: str) -> bytes:
        return self.files[self.manifest.graph(graph).onnx_file]


class ModelStore:
    def __init__(self, backend: StoreBackend, cache: BlobCache | None = None):
        self.backend = backend
        self.cache = cache          # verified files by sha256 on local disk; None: always read the store

    @classmethod
    def open(cls, uri: str | os.PathLike | None = None, *, cache: BlobCache | str | os.PathLike | bool | None = None,
             **storage_options) -> ModelStore:
        """uri: a local path, file:// URI, or fsspec URI (s3://, gs://, memory://, ...); default
        GENSERVE_STORE, else ./model_store_data. storage_options go to fsspec.filesystem() (for s3://,
        never credentials or the endpoint: those come from the AWS_* environment variables).
        cache: None (default) -> a BlobCache in $GENSERVE_CACHE_DIR for remote object stores, none for a
        local store or memory:// (the files are local already); False -> none; a path or BlobCache -> it."""
        backend = open_backend(uri if uri is not None else default_store_uri(), **storage_options)
        if cache is None:    # local disk or this process's memory (memory://): a cache would only copy it
            cache = not isinstance(backend, LocalBackend) and getattr(backend, "remote", True)
        if cache is True:
            cache = BlobCache()
        elif cache is False:
            cache = None
        elif not isinstance(cache, BlobCache):
            cache = BlobCache(cache)
        return cls(backend, cache)

    @property
    def uri(self) -> str:
        return self.backend.uri

    # ---- reading -------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return [m for m in self.backend.list_dir("") if _NAME.match(m) and self.versions(m)]

    def versions(self, model: str) -> list[str]:
        check_name("model", model)
        return [v for v in self.backend.list_dir(model)
                if _NAME.match(v) and self.backend.exists(f"{model}/{v}/{MANIFEST_FILE}")]

    def has_version(self, model: str, version: str) -> bool:
        """A version exists only once its manifest.json does: object stores publish the manifest last, so a
        folder without one is an upload in progress or a crashed publish, never a version."""
        return self.backend.exists(f"{check_name('model', model)}/{check_name('version', version)}/{MANIFEST_FILE}")

    def aliases(self, model: str) -> dict[str, str]:
        """alias -> version."""
        check_name("model", model)
        out = {}
        for name in self.backend.list_dir(f"{model}/{ALIASES}"):
            if _NAME.match(name):
                out[name] = json.loads(self.backend.read_bytes(f"{model}/{ALIASES}/{name}"))["version"]
        return out

    def resolve(self, ref: str) -> tuple[str, str]:
        """'model', 'model@version' or 'model@alias' -> (model, version). A bare model means @latest; a
        name that is both resolves to the version (set_alias refuses to create such a clash)."""
        model, _, tag = ref.partition("@")
        check_name("model", model)
        tag = check_name("version or alias", tag or DEFAULT_ALIAS)
        if self.has_version(model, tag):
            return model, tag
        aliases = self.aliases(model)
        if tag in aliases:
            return model, aliases[tag]
        known = self.versions(model)
        if not known:
            raise NotFound(f"no model {model!r} in store {self.uri}")
        raise NotFound(f"{model} has no version or alias {tag!r}; versions: {', '.join(known)}; "
                       f"aliases: {', '.join(f'{a}->{v}' for a, v in aliases.items()) or 'none'}")

    def manifest(self, ref: str) -> Manifest:
        """The manifest as stored, NOT verified: for listing. Use load() for anything served."""
        model, version = self.resolve(ref)
        try:
            return Manifest.from_json(self.backend.read_bytes(f"{model}/{version}/{MANIFEST_FILE}"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{model}@{version}: unreadable {MANIFEST_FILE}: {exc!r}") from exc

    def load(self, ref: str, *, use_cache: bool = True) -> LoadedVersion:
        """Resolve, then verify every file against the manifest; raise IntegrityError on any mismatch,
        missing or unlisted file, or anything escaping the version folder ('..', absolute, symlink).

        With a blob cache (and use_cache), the alias, the manifest and the version's listing are still read
        from the store, but a file whose sha256 is cached (and re-hashes right) is not read from the store.
        Files read from the store are cached only after the WHOLE version verified: a version that fails
        caches nothing, and a tampered object is never cached."""
        model, version = self.resolve(ref)
        key = f"{model}/{version}"
        where = f"{model}@{version}"
        entries = self.backend.walk(key)
        for e in entries:
            if e.kind == "symlink":
                scope = "escapes the version folder" if e.escapes else "is a symlink (versions hold plain files only)"
                raise IntegrityError(f"{where}: {e.path} -> {e.target} {scope}; refusing to load")
            if e.kind == "other":
                raise IntegrityError(f"{where}: {e.path} is not a regular file; refusing to load")
        try:
            manifest = Manifest.from_json(self.backend.read_bytes(f"{key}/{MANIFEST_FILE}"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{where}: unreadable {MANIFEST_FILE}: {exc}") from exc
        if (manifest.model, manifest.version) != (model, version):
            raise IntegrityError(f"{where}: manifest says {manifest.model}@{manifest.version}")
        for rel in manifest.files:
            _check_relpath(where, rel)
        on_disk = {e.path for e in entries if e.kind == "file"} - {MANIFEST_FILE}
        if missing := sorted(set(manifest.files) - on_disk):
            raise IntegrityError(f"{where}: missing files {missing}")
        if extra := sorted(on_disk - set(manifest.files)):
            raise IntegrityError(f"{where}: files not in the manifest {extra}")
        for g in manifest.graphs:
            if g.onnx_file not in manifest.files:
                raise IntegrityError(f"{where}: graph {g.graph} has no file {g.onnx_file}")
        cache = self.cache if use_cache else None
        files: dict[str, bytes] = {}
        from_cache, fetched = set(), {}
        for rel, want in sorted(manifest.files.items()):
            data = cache.get(want.sha256, want.size) if cache is not None else None
            if data is not None:
                files[rel] = data
                from_cache.add(rel)
                continue
            data = self.backend.read_bytes(f"{key}/{rel}")
            actual = sha256_bytes(data)
            if len(data) != want.size or actual != want.sha256:
                raise IntegrityError(
                    f"model {model} version {version}: file {rel} does not match its manifest hash: expected "
                    f"sha256 {want.sha256} ({want.size} bytes), got sha256 {actual} ({len(data)} bytes) from "
                    f"{self.uri}/{key}/{rel}; the file was modified or corrupted, refusing to load {where} "
                    f"(nothing of it is cached)")
            files[rel] = data
            fetched[want.sha256] = data
        if cache is not None:
            for sha, data in fetched.items():
                cache.put(sha, data)
            log.info("%s: %d file(s) from the blob cache %s, %d read from %s", where, len(from_cache),
                     cache.root, len(files) - len(from_cache), self.uri)
        return LoadedVersion(manifest, files, frozenset(from_cache))

    def verify(self, ref: str) -> Manifest:
        """Check the version as it is IN THE STORE: reads every file from the store, bypassing the cache."""
        return self.load(ref, use_cache=False).manifest

    # ---- writing -------------------------------------------------------------------------------

    def publish(self, source_dir: Path, manifest: Manifest, aliases: tuple[str, ...] = ()) -> Manifest:
        """Publish every file of source_dir as manifest.model@manifest.version, atomically: readers see the
        whole version or nothing. Raises VersionExists if the version exists (also when a concurrent
        publish of the same version wins). Then points `aliases` at it."""
        check_name("model", manifest.model)
        check_name("version", manifest.version)
        for alias in aliases:
            check_name("alias", alias)
        if self.has_version(manifest.model, manifest.version):
            raise VersionExists(f"{manifest.model}@{manifest.version} already exists; versions are immutable")
        if manifest.version in self.aliases(manifest.model):
            raise StoreError(f"{manifest.model}: {manifest.version!r} is already an alias name")
        files: dict[str, bytes] = {}
        for path in sorted(Path(source_dir).rglob("*")):
            rel = path.relative_to(source_dir).as_posix()
            if path.is_symlink():
                raise StoreError(f"refusing to publish symlink {path}: versions hold plain files only")
            if path.is_file():
                if rel == MANIFEST_FILE:
                    raise StoreError(f"{source_dir} already holds a {MANIFEST_FILE}; the store writes it")
                files[rel] = path.read_bytes()  # read once: the hash is of exactly the bytes written
        manifest.files = {rel: FileEntry(sha256_bytes(data), len(data)) for rel, data in files.items()}
        files[MANIFEST_FILE] = manifest.to_json()
        self.backend.commit_dir(f"{manifest.model}/{manifest.version}", files)
        for alias in aliases:
            self.set_alias(manifest.model, alias, manifest.version)
        return manifest

    def set_alias(self, model: str, alias: str, version: str) -> None:
        """Point alias at an existing version; readers see the old target or the new, never neither."""
        check_name("alias", alias)
        if not self.has_version(model, version):
            raise NotFound(f"cannot point {model}@{alias} at {version!r}: no such version")
        if self.has_version(model, alias):
            raise StoreError(f"{model}: {alias!r} is a version name; pick another alias name")
        payload = json.dumps({"version": version}).encode() + b"\n"
        self.backend.replace_bytes(f"{model}/{ALIASES}/{alias}", payload)

    def delete_alias(self, model: str, alias: str) -> None:
        if alias not in self.aliases(model):
            raise NotFound(f"{model} has no alias {alias!r}")
        self.backend.remove(f"{model}/{ALIASES}/{check_name('alias', alias)}")

    def gc(self, model: str | None = None, *, keep_recent: int = 0, dry_run: bool = False,
           stale_after_s: float = STALE_STAGING_S) -> list[str]:
        """Remove versions no alias points to, except the keep_recent newest per model; also leftovers of
        crashed publishes older than stale_after_s. Returns what was (or would be) removed."""
        if keep_recent < 0:
            raise ValueError(f"keep_recent must be an integer >= 0, got {keep_recent}")
        removed = []
        for m in [model] if model else self.models():
            pinned = set(self.aliases(m).values())
            by_age = sorted(self.versions(m), key=lambda v: self._created_at(m, v), reverse=True)
            for version in by_age[keep_recent:]:
                if version not in pinned:
                    removed.append(f"{m}@{version}")
                    if not dry_run:
                        self.backend.remove(f"{m}/{version}")
        if not dry_run:
            removed += self.backend.cleanup(stale_after_s)
        return removed

    def _created_at(self, model: str, version: str) -> str:
        try:
            return json.loads(self.backend.read_bytes(f"{model}/{version}/{MANIFEST_FILE}"))["created_at"]
        except (OSError, ValueError, KeyError):
            return ""  # unreadable manifests sort oldest


def _check_relpath(where: str, rel: str) -> None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or rel != p.as_posix() or rel in ("", ".") \
            or rel == MANIFEST_FILE:
        raise IntegrityError(f"{where}: manifest lists {rel!r}, which escapes the version folder; refusing to load")
