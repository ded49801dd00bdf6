"""The model store on S3, against a REAL S3-compatible server: moto in server mode, a separate process on
127.0.0.1 speaking HTTP, reached through s3fs/botocore with the endpoint and credentials taken only from
the AWS_* environment variables. Covers: publish (and `genserve build --store s3://...`), load with every
hash verified, the node-local blob cache (a second load, in-process and from another process, GETs no
artifact: checked in the SERVER's access log, not only by our counter), tampering refused with a clear
IntegrityError and never cached, a corrupt cache file re-hashed and replaced, credentials in the URI
refused, missing credentials a clear StoreError."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="the S3 model store needs s3fs (pip install -e '.[test]')")
pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (pip install -e '.[test]')")

import s3fs  # noqa: E402

from model_store import BlobCache, IntegrityError, ModelStore, StoreError  # noqa: E402
from model_store.fsspec_backend import FsspecBackend, s3_options  # noqa: E402
from tests.helpers import run_cli  # noqa: E402
from tests.s3server import free_local_port, request_log, start_moto_server, stop_moto_server  # noqa: E402
from tests.test_model_store import make_manifest, make_source  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILES = ("generate.onnx", "extra/notes.txt")     # what make_source writes


@pytest.fixture(scope="module")
def moto():
    proc, endpoint = start_moto_server("127.0.0.1", free_local_port())
    yield proc, endpoint
    stop_moto_server(proc, remove_log=True)


@pytest.fixture
def s3(moto, monkeypatch, tmp_path):
    """A fresh bucket on the moto server, the AWS_* variables pointing at it, and a per-test cache dir.
    Returns a namespace: uri (s3://bucket/models), bucket, fs (a raw s3fs client for tampering), proc."""
    proc, endpoint = moto
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                 "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "GENSERVE_STORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("GENSERVE_CACHE_DIR", str(tmp_path / "blob-cache"))
    bucket = f"genserve-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(key="testing-key-id", secret="testing-secret", skip_instance_cache=True,
                           use_listings_cache=False, client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(bucket)

    class S3:
        pass

    ns = S3()
    ns.uri, ns.bucket, ns.fs, ns.proc, ns.endpoint = f"s3://{bucket}/models", bucket, fs, proc, endpoint
    ns.cache_dir = tmp_path / "blob-cache"
    return ns


def publish(store: ModelStore, tmp: Path, version: str = "v1"):
    return store.publish(make_source(tmp / version), make_manifest(version), aliases=("latest",))


def server_log_after(s3, offset: int) -> str:
    """The server's access log past offset, once it has caught up: make one marker request and wait until
    its line appears (werkzeug logs a request after answering it)."""
    marker = f"log-marker-{uuid.uuid4().hex}"
    s3.fs.exists(f"{s3.bucket}/{marker}")
    deadline = time.monotonic() + 10
    while marker not in (text := request_log(s3.proc)[offset:]):
        assert time.monotonic() < deadline, "the moto server's access log never showed the marker request"
        time.sleep(0.05)
    return text


def blob_gets(log_text: str, bucket: str, key: str) -> int:
    return sum(f"GET /{bucket}/{key} " in line or f"GET /{bucket}/{key}?" in line
               for line in log_text.splitlines())


def load_in_another_process(uri: str) -> dict:
    """A second replica on this node: a fresh process, same environment (so the same cache dir)."""
    code = textwrap.dedent(f"""
        import json
        from model_store import ModelStore
        store = ModelStore.open({uri!r})
        loaded = store.load("gan@latest")
        print(json.dumps({{"from_cache": sorted(loaded.from_cache), "stats": store.cache.stats.to_dict(),
                          "sizes": {{k: len(v) for k, v in loaded.files.items()}}}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_publish_load_verify_then_the_second_load_downloads_nothing(s3, tmp_path):
    store = ModelStore.open(s3.uri)
    assert isinstance(store.backend, FsspecBackend) and store.backend.remote
    assert store.cache is not None and store.cache.root == s3.cache_dir.absolute()
    manifest = publish(store, tmp_path)
    assert s3.fs.exists(f"{s3.bucket}/models/gan/v1/manifest.json")         # really in the bucket

    offset = len(request_log(s3.proc))
    first = store.load("gan@latest")
    log1 = server_log_after(s3, offset)
    assert first.files == {"generate.onnx": b"graph-bytes", "extra/notes.txt": b"hello"}
    assert first.from_cache == frozenset()
    for rel in FILES:                                 # the access log does show blob downloads ...
        assert blob_gets(log1, s3.bucket, f"models/gan/v1/{rel}") >= 1, log1
    assert store.cache.stats.to_dict() == {"hits": 0, "misses": 2, "stored": 2, "corrupt": 0, "write_errors": 0}
    assert store.cache.blobs() == sorted(e.sha256 for e in manifest.files.values())
    for sha in store.cache.blobs():                   # stored under their own hash, nothing else in the folder
        assert hashlib.sha256((s3.cache_dir / sha).read_bytes()).hexdigest() == sha
    assert sorted(os.listdir(s3.cache_dir)) == store.cache.blobs()

    offset = len(request_log(s3.proc))
    again = ModelStore.open(s3.uri).load("gan@latest")                      # a new store object, same process
    other = load_in_another_process(s3.uri)                                 # a second replica on this node
    log2 = server_log_after(s3, offset)
    assert again.files == first.files and again.from_cache == frozenset(FILES)
    assert other["from_cache"] == sorted(FILES) and other["sizes"] == {"generate.onnx": 11, "extra/notes.txt": 5}
    assert other["stats"]["hits"] == 2 and other["stats"]["misses"] == 0 and other["stats"]["stored"] == 0
    for rel in FILES:                                 # ... and none during the two cached loads
        assert blob_gets(log2, s3.bucket, f"models/gan/v1/{rel}") == 0, log2
    # the alias and the manifest are still read from the store (aliases move)
    assert blob_gets(log2, s3.bucket, "models/gan/.aliases/latest") == 2, log2
    assert blob_gets(log2, s3.bucket, "models/gan/v1/manifest.json") == 2, log2


def test_an_alias_move_is_seen_through_the_cache(s3, tmp_path):
    store = ModelStore.open(s3.uri)
    publish(store, tmp_path, "v1")
    assert store.load("gan@latest").manifest.version == "v1"
    other = store.publish(make_source(tmp_path / "v2", b"new-graph"), make_manifest("v2"), aliases=("latest",))
    loaded = ModelStore.open(s3.uri).load("gan@latest")
    assert loaded.manifest.version == "v2" and loaded.files["generate.onnx"] == b"new-graph"
    assert loaded.from_cache == {"extra/notes.txt"}             # unchanged file, same hash: shared blob
    assert other.files["generate.onnx"].sha256 in store.cache.blobs()


def test_a_tampered_object_is_refused_by_name_and_hash_and_never_cached(s3, tmp_path, capsys):
    store = ModelStore.open(s3.uri)
    manifest = publish(store, tmp_path)
    tampered = b"graph-bytes, but not the ones published"
    s3.fs.pipe_file(f"{s3.bucket}/models/gan/v1/generate.onnx", tampered)      # someone rewrites the object
    actual = hashlib.sha256(tampered).hexdigest()
    expected = manifest.files["generate.onnx"].sha256
    with pytest.raises(IntegrityError) as err:
        store.load("gan@latest")
    msg = str(err.value)
    for part in ("model gan", "version v1", "file generate.onnx", "does not match its manifest hash",
                 f"expected sha256 {expected}", f"got sha256 {actual}", s3.uri):
        assert part in msg, msg
    assert store.cache.stats.stored == 0 and store.cache.blobs() == []      # nothing of the version cached
    assert not s3.cache_dir.exists() or os.listdir(s3.cache_dir) == []     # no temp file either
    assert actual not in store.cache

    with pytest.raises(IntegrityError, match="1 of 1 version"):            # the CLI says so too
        run_cli("store", "verify", "--store", s3.uri)
    assert "FAILED  model gan version v1: file generate.onnx" in capsys.readouterr().out


def test_verify_checks_the_store_not_the_cache(s3, tmp_path, capsys):
    """Once the genuine bytes are cached, serving keeps using them (they ARE what the manifest names), but
    `verify` reads the store itself, so tampering in the bucket is still reported."""
    store = ModelStore.open(s3.uri)
    publish(store, tmp_path)
    store.load("gan@v1")
    s3.fs.pipe_file(f"{s3.bucket}/models/gan/v1/generate.onnx", b"evil")
    assert ModelStore.open(s3.uri).load("gan@v1").files["generate.onnx"] == b"graph-bytes"
    with pytest.raises(IntegrityError, match="generate.onnx does not match its manifest hash"):
        store.verify("gan@v1")
    assert hashlib.sha256(b"evil").hexdigest() not in store.cache


def test_a_corrupt_cache_file_is_rehashed_deleted_and_fetched_again(s3, tmp_path):
    store = ModelStore.open(s3.uri)
    manifest = publish(store, tmp_path)
    store.load("gan@v1")
    sha = manifest.files["generate.onnx"].sha256
    (s3.cache_dir / sha).write_bytes(b"graph-bytez")          # same size, one byte off: bit rot, or a local attacker
    fresh = ModelStore.open(s3.uri)
    loaded = fresh.load("gan@v1")
    assert loaded.files["generate.onnx"] == b"graph-bytes" and loaded.from_cache == {"extra/notes.txt"}
    assert fresh.cache.stats.corrupt == 1 and fresh.cache.stats.stored == 1
    assert (s3.cache_dir / sha).read_bytes() == b"graph-bytes"


def test_replicas_racing_on_an_empty_cache_both_load_and_leave_one_good_copy(s3, tmp_path):
    publish(ModelStore.open(s3.uri), tmp_path)
    results = [None, None]

    def replica(i):
        results[i] = load_in_another_process(s3.uri)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r["sizes"] == {"generate.onnx": 11, "extra/notes.txt": 5} for r in results)
    cache = BlobCache(s3.cache_dir)
    assert len(cache.blobs()) == 2 and sorted(os.listdir(s3.cache_dir)) == cache.blobs()   # no temp leftovers
    for sha in cache.blobs():
        assert hashlib.sha256((s3.cache_dir / sha).read_bytes()).hexdigest() == sha


def test_the_cache_refuses_bytes_that_are_not_its_name(tmp_path):
    cache = BlobCache(tmp_path / "c")
    with pytest.raises(ValueError, match="refusing to cache"):
        cache.put(hashlib.sha256(b"a").hexdigest(), b"b")
    with pytest.raises(ValueError, match="not a sha256"):
        cache.get("../../etc/passwd", 1)
    assert cache.blobs() == []


def test_credentials_in_the_uri_or_options_are_refused(s3):
    for uri in (f"s3://AKIAEXAMPLE:wJalrSECRETKEY@{s3.bucket}/models",
                f"s3://{s3.bucket}/models?aws_secret_access_key=wJalrSECRETKEY",
                f"s3://AKIAEXAMPLE@{s3.bucket}/models"):
        with pytest.raises(StoreError, match="carries credentials") as err:
            ModelStore.open(uri)
        assert "wJalrSECRETKEY" not in str(err.value) and "AKIAEXAMPLE" not in str(err.value)
        assert "AWS_ACCESS_KEY_ID" in str(err.value)
    for options in ({"key": "k", "secret": "s"}, {"client_kwargs": {"endpoint_url": "http://elsewhere"}}):
        with pytest.raises(StoreError, match="come only from the environment"):
            ModelStore.open(s3.uri, **options)
    with pytest.raises(StoreError, match="carries credentials"):
        run_cli("store", "ls", "--store", f"s3://user:pw@{s3.bucket}/models")


def test_missing_credentials_are_a_clear_store_error(s3, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match=r"needs S3 credentials: AWS_SECRET_ACCESS_KEY is not set"):
        ModelStore.open(s3.uri)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set"):
        run_cli("store", "ls", "--store", s3.uri)


def test_endpoint_and_region_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")      # botocore's precedence
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", raising=False)
    opts = s3_options("s3://b/p", {})
    assert opts["key"] == "k" and opts["secret"] == "s" and opts["token"] == "t"
    assert opts["client_kwargs"] == {"endpoint_url": "http://s3-specific:2", "region_name": "eu-west-1"}
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert "endpoint_url" not in s3_options("s3://b/p", {})["client_kwargs"]
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "false")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "ftp://nope")
    with pytest.raises(StoreError, match="must be an http"):
        s3_options("s3://b/p", {})


def test_genserve_build_publishes_into_s3_and_serves_from_it(s3, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from tests.test_build import write_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path / "checkpoints"
        write_checkpoint(root, "gan")
        run_cli("build", "gan", "--checkpoints", str(root), "--store", s3.uri, "--max-batch", "2")
        assert "build: 1 published, 0 current, 0 skipped" in capsys.readouterr().out
        run_cli("build", "gan", "--checkpoints", str(root), "--store", s3.uri, "--max-batch", "2")
        assert "build: 0 published, 1 current, 0 skipped" in capsys.readouterr().out     # idempotent on S3
    finally:
        torch.set_num_threads(threads)
    store = ModelStore.open(s3.uri)
    loaded = store.load("gan@latest")
    assert loaded.manifest.family == "gan" and set(loaded.files) == {"generate.onnx"}
    assert s3.fs.cat_file(f"{s3.bucket}/models/gan/{loaded.manifest.version}/generate.onnx") == \
        loaded.graph_bytes("generate")
    run_cli("store", "verify", "--store", s3.uri)
    run_cli("store", "ls", "--store", s3.uri)
    out = capsys.readouterr().out
    assert f"ok      gan@{loaded.manifest.version}" in out and "latest" in out


def test_start_moto_server_fails_with_the_servers_output(moto):
    _, endpoint = moto
    taken = int(endpoint.rsplit(":", 1)[1])                 # the module's server answers on this port
    with pytest.raises(RuntimeError, match="something already answers there"):
        start_moto_server("127.0.0.1", taken, timeout_s=20)
    with socket.socket() as held:                           # bound, not listening: moto cannot bind it
        held.bind(("127.0.0.1", 0))
        with pytest.raises(RuntimeError, match="exited with .* before answering") as err:
            start_moto_server("127.0.0.1", held.getsockname()[1], timeout_s=20)
    assert "in use" in str(err.value).lower()               # the server's own output is in the error
