"""Model store on an object store, through fsspec's in-process memory:// filesystem: round trip with hashes
verified, immutability, a crashed upload never visible (and gc'd), aliases, tamper and path refusal, CLI."""
from __future__ import annotations

import json
import uuid

import fsspec
import pytest

from model_store import IntegrityError, ModelStore, NotFound, StoreError, VersionExists
from model_store.fsspec_backend import FsspecBackend
from tests.test_model_store import make_manifest, make_source
from tests.helpers import run_cli


@pytest.fixture
def store() -> ModelStore:
    uri = f"memory://bucket-{uuid.uuid4().hex[:8]}/models"    # memory:// is per process and shared: unique prefix
    s = ModelStore.open(uri)
    yield s
    if s.backend.fs.exists(s.backend.root):
        s.backend.fs.rm(s.backend.root, recursive=True)


def publish(store, tmp, version, **kw):
    return store.publish(make_source(tmp), make_manifest(version, **kw), aliases=("latest",))


def obj(store, key: str) -> str:
    return f"{store.backend.root}/{key}"


def test_memory_uri_opens_the_fsspec_backend(store):
    assert isinstance(store.backend, FsspecBackend) and store.uri.startswith("memory://bucket-")
    with pytest.raises(StoreError, match="unknown model store URI scheme nosuch://"):
        ModelStore.open("nosuch://x")


def test_publish_then_load_round_trips(store, tmp_path):
    m = publish(store, tmp_path, "v1")
    assert store.models() == ["gan"] and store.versions("gan") == ["v1"]
    loaded = store.load("gan")
    assert loaded.manifest.version == "v1" and loaded.graph_bytes("generate") == b"graph-bytes"
    assert loaded.files == {"generate.onnx": b"graph-bytes", "extra/notes.txt": b"hello"}
    assert set(m.files) == {"generate.onnx", "extra/notes.txt"}
    assert store.verify("gan@v1").files["generate.onnx"].size == len(b"graph-bytes")


def test_publishing_an_existing_version_fails(store, tmp_path):
    publish(store, tmp_path, "v1")
    with pytest.raises(VersionExists):
        store.publish(make_source(tmp_path, b"other"), make_manifest("v1"))
    with pytest.raises(VersionExists):    # the backend's put-if-absent refuses it too, bypassing the store's check
        store.backend.commit_dir("gan/v1", {"manifest.json": b"{}"})
    assert store.load("gan@v1").graph_bytes("generate") == b"graph-bytes"


def test_publish_failing_midway_leaves_no_visible_version_and_gc_cleans_it(store, tmp_path, monkeypatch):
    fs, real, calls = store.backend.fs, store.backend.fs.pipe_file, []

    def failing(path, data, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("connection reset")
        return real(path, data, *a, **kw)

    monkeypatch.setattr(fs, "pipe_file", failing)
    with pytest.raises(OSError, match="connection reset"):
        publish(store, tmp_path, "v1")
    monkeypatch.undo()
    assert fs.exists(obj(store, "gan/v1"))                    # one artifact was uploaded ...
    assert not fs.exists(obj(store, "gan/v1/manifest.json"))  # ... but no manifest, so no version
    assert store.versions("gan") == [] and store.models() == []
    with pytest.raises(NotFound):
        store.load("gan@v1")
    assert store.gc() == []                                   # young leftovers may be an upload in progress
    assert store.gc(stale_after_s=0) == ["gan/v1"]
    assert not fs.exists(obj(store, "gan/v1"))
    publish(store, tmp_path, "v1")                            # the version can be published afterwards
    store.load("gan@v1")


def test_leftovers_of_a_crashed_publish_do_not_break_a_retry(store, tmp_path):
    store.backend.fs.pipe_file(obj(store, "gan/v1/stale.onnx"), b"half")
    publish(store, tmp_path, "v1")
    assert sorted(store.load("gan@v1").files) == ["extra/notes.txt", "generate.onnx"]


def test_aliases_move(store, tmp_path):
    publish(store, tmp_path, "v1")
    publish(store, tmp_path, "v2")
    assert store.resolve("gan") == ("gan", "v2")
    store.set_alias("gan", "stable", "v1")
    assert store.resolve("gan@stable") == ("gan", "v1")
    store.set_alias("gan", "stable", "v2")
    assert store.aliases("gan") == {"latest": "v2", "stable": "v2"}
    assert json.loads(store.backend.fs.cat_file(obj(store, "gan/.aliases/stable"))) == {"version": "v2"}
    store.delete_alias("gan", "stable")
    with pytest.raises(NotFound):
        store.resolve("gan@stable")
    store.set_alias("gan", "stable", "v1")
    assert store.gc() == [] and store.versions("gan") == ["v1", "v2"]   # both pinned


def test_one_flipped_byte_is_refused(store, tmp_path):
    publish(store, tmp_path, "v1")
    fs, path = store.backend.fs, obj(store, "gan/v1/generate.onnx")
    data = bytearray(fs.cat_file(path))
    data[3] ^= 0x01
    fs.pipe_file(path, bytes(data))
    with pytest.raises(IntegrityError, match="generate.onnx does not match its manifest hash"):
        store.load("gan@v1")


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/hostname", "extra/../../outside.bin"])
def test_manifest_paths_escaping_the_version_are_refused(store, tmp_path, bad):
    publish(store, tmp_path, "v1")
    fs, path = store.backend.fs, obj(store, "gan/v1/manifest.json")
    data = json.loads(fs.cat_file(path))
    data["files"][bad] = {"sha256": "0" * 64, "size": 1}
    fs.pipe_file(path, json.dumps(data).encode())
    with pytest.raises(IntegrityError, match="escapes the version folder"):
        store.load("gan@v1")


def test_backend_refuses_escaping_keys(store):
    for key in ("../x", "/etc/hostname", "a/../../x"):
        with pytest.raises(StoreError, match="escapes the store"):
            store.backend.read_bytes(key)


def test_store_cli_on_memory_store(store, tmp_path, capsys):
    publish(store, tmp_path, "v1", created_at="2026-01-01T00:00:00+00:00")
    publish(store, tmp_path, "v2", created_at="2026-01-02T00:00:00+00:00")
    store.backend.fs.pipe_file(obj(store, "gan/v3/generate.onnx"), b"half")   # crashed upload: not listed
    s = ["--store", store.uri]
    run_cli("store", "ls", *s)
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out] == [["gan", "v1"], ["gan", "v2"]]
    assert out[1].split()[3] == "latest" and "fd=12.5" in out[1]
    run_cli("store", "verify", *s)
    assert capsys.readouterr().out.count("ok ") == 2
    run_cli("store", "alias", "gan", "stable", "v1", *s)
    run_cli("store", "gc", "--dry-run", *s)
    assert "nothing to remove" in capsys.readouterr().out.splitlines()[-1]
    assert fsspec.filesystem("memory").exists(obj(store, "gan/v3"))
