"""Object stores (s3://, gs://, az://, memory://, ...) through fsspec.

Object stores have no atomic directory rename, so a version is published differently from the local
backend: every artifact is uploaded under <model>/<version>/ first, then manifest.json LAST with a
put-if-absent. The store treats a version as existing only when its manifest.json does (readers, `ls` and
resolve ignore manifest-less folders), so a publish that dies mid-upload never leaves a visible version;
`gc` (cleanup) removes such leftovers once they are older than the stale age. Aliases are single small
objects overwritten whole: an object PUT is atomic per object, so readers see the old or the new.

S3 (s3://bucket/prefix, through s3fs): credentials and the endpoint come ONLY from the standard AWS
environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_SESSION_TOKEN;
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible server; AWS_DEFAULT_REGION or AWS_REGION),
read here explicitly, so the behaviour does not depend on the botocore version (botocore >= 1.31 reads
AWS_ENDPOINT_URL itself; older ones ignore it). A URI carrying credentials (`s3://KEY:SECRET@bucket`) or
a query, and storage options naming credentials or an endpoint, are refused: a Serve config file or a
command line is not a place for secrets."""
from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from model_store.backend import Entry
from model_store.errors import StoreError, VersionExists
from model_store.manifest import MANIFEST_FILE


# Storage options that would carry a secret or an endpoint (s3fs / botocore spellings): refused for s3://.
_S3_FORBIDDEN_OPTIONS = {"key", "secret", "token", "username", "password", "endpoint_url", "profile",
                         "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
S3_ENV_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
               "credentials), AWS_ENDPOINT_URL for an S3-compatible server, AWS_DEFAULT_REGION if needed, in "
               "the environment of every process that opens the store (on a Ray cluster: of every node, "
               "before `ray start`)")


def _redacted(uri: str) -> str:
    """The URI without anything that may be a secret (user info, query, fragment), for error messages."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{'***@' if '@' in parts.netloc else ''}{host}{parts.path}"


def check_uri_has_no_credentials(uri: str) -> None:
    """Refuse `scheme://user:secret@bucket/...` and any `?query` / `#fragment`: store URIs live in config
    files and command lines, where secrets leak; credentials and options come from the environment."""
    parts = urlsplit(uri)
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise StoreError(f"refusing model store URI {_redacted(uri)}: it carries credentials or options "
                         f"(user info, ?query or #fragment). Store URIs name a location only "
                         f"(s3://bucket/prefix); {S3_ENV_HELP}")


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def s3_options(uri: str, options: dict) -> dict:
    """s3fs options for uri from the AWS environment variables, plus the caller's non-secret options.
    Raises StoreError when the credentials are missing or options try to carry secrets/endpoints."""
    bad = sorted(k for k in options if k.lower() in _S3_FORBIDDEN_OPTIONS)
    bad += sorted(f"client_kwargs.{k}" for k in (options.get("client_kwargs") or {})
                  if k.lower() in _S3_FORBIDDEN_OPTIONS)
    if bad:
        raise StoreError(f"refusing storage options {bad} for {_redacted(uri)}: S3 credentials and the endpoint "
                         f"come only from the environment; {S3_ENV_HELP}")
    out = dict(options)
    if not out.get("anon"):
        key, secret = _env("AWS_ACCESS_KEY_ID"), _env("AWS_SECRET_ACCESS_KEY")
        missing = [n for n, v in (("AWS_ACCESS_KEY_ID", key), ("AWS_SECRET_ACCESS_KEY", secret)) if v is None]
        if missing:
            raise StoreError(f"model store {_redacted(uri)} needs S3 credentials: {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not set; {S3_ENV_HELP}")
        out.update(key=key, secret=secret)
        if token := _env("AWS_SESSION_TOKEN"):
            out["token"] = token
    client_kwargs = dict(out.get("client_kwargs") or {})
    ignore = (_env("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() == "true"
    endpoint = None if ignore else (_env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL"))
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StoreError(f"AWS_ENDPOINT_URL(_S3) must be an http(s):// URL, got {_redacted(endpoint)!r}")
        if "@" in parts.netloc:
            raise StoreError(f"refusing AWS_ENDPOINT_URL(_S3) {_redacted(endpoint)}: it carries credentials; "
                             f"{S3_ENV_HELP}")
        client_kwargs["endpoint_url"] = endpoint
    if region := (_env("AWS_DEFAULT_REGION") or _env("AWS_REGION")):
        client_kwargs.setdefault("region_name", region)
    if client_kwargs:
        out["client_kwargs"] = client_kwargs
    # The store re-lists and re-reads what moves (aliases, manifests); a listings cache in a long-lived
    # replica would serve stale ones.
    out.setdefault("use_listings_cache", False)
    return out


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
        check_uri_has_no_credentials(uri)
        protocol = uri.split("://", 1)[0]
        try:
            fs_cls = fsspec.get_filesystem_class(protocol)
        except ValueError as exc:
            raise StoreError(f"unknown model store URI scheme {protocol}:// in {uri!r}: use a local path, "
                             f"file://, or an fsspec protocol (s3://, gs://, memory://, ...)") from exc
        except ImportError as exc:
            hint = " (pip install s3fs)" if protocol in ("s3", "s3a") else ""
            raise StoreError(f"model store {uri!r} needs the fsspec implementation for {protocol}://{hint} "
                             f"({exc})") from exc
        if protocol in ("s3", "s3a"):
            options = s3_options(uri, options)
        self.fs = fsspec.filesystem(protocol, **options)
        self.protocol = protocol
        self.root = fs_cls._strip_protocol(uri).rstrip("/")
        self.uri = uri.rstrip("/")
        # Files of this filesystem are already in this process or on local disk: a blob cache would only
        # copy them (ModelStore.open reads this).
        self.remote = not any(p in ("memory", "file", "local")
                              for p in ((fs_cls.protocol,) if isinstance(fs_cls.protocol, str) else fs_cls.protocol))

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

