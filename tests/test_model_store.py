"""Model store: round trip, immutability, atomic and concurrent publish, aliases, tamper and path-escape
refusal, gc, backends and the `genserve store` CLI. No torch: versions are built from hand-made files."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from core.contracts import contracts_for
from core.settings import SamplingSetting
from model_store import (IntegrityError, Manifest, ModelStore, NotFound, SamplingSettings, StoreError,
                         VersionExists)
from model_store.backend import STAGING, LocalBackend
from model_store.store import open_backend
from model_store.manifest import LatencyProfile
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parent.parent


def make_source(tmp: Path, payload: bytes = b"graph-bytes") -> Path:
    """A folder shaped like an export: the gan graph plus a nested extra file."""
    src = tmp / f"src-{os.urandom(4).hex()}"
    (src / "extra").mkdir(parents=True)
    (src / "generate.onnx").write_bytes(payload)
    (src / "extra" / "notes.txt").write_bytes(b"hello")
    return src


def make_manifest(version: str, model: str = "gan", created_at: str = "2026-01-01T00:00:00+00:00") -> Manifest:
    return Manifest(model=model, version=version, family="gan", created_at=created_at,
                    graphs=contracts_for("gan", {"z_dim": 64}), sampling=SamplingSettings(SamplingSetting(), [SamplingSetting()]),
                    metrics={"fd": 12.5},
                    latency=LatencyProfile(machine={"cpu": "test"}, provider="CPUExecutionProvider",
                                           provider_reason="test", threads=1, measured_at=created_at,
                                           ms_per_forward={"generate": {1: 0.5, 2: 0.7}}))


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore.open(tmp_path / "store")


def publish(store: ModelStore, tmp: Path, version: str, **kw) -> Manifest:
    return store.publish(make_source(tmp), make_manifest(version, **kw), aliases=("latest",))


def version_dir(store: ModelStore, model: str, version: str) -> Path:
    return Path(store.uri) / model / version


# ---- round trip and immutability ---------------------------------------------------------------

def test_publish_then_load_round_trips(store, tmp_path):
    published = publish(store, tmp_path, "v1")
    loaded = store.load("gan")                      # bare name -> @latest
    assert loaded.manifest.to_dict() == published.to_dict()
    assert loaded.graph_bytes("generate") == b"graph-bytes"
    assert set(loaded.files) == {"generate.onnx", "extra/notes.txt"}
    assert loaded.manifest.latency.ms_per_forward == {"generate": {1: 0.5, 2: 0.7}}
    assert store.models() == ["gan"] and store.versions("gan") == ["v1"]
    assert Manifest.from_json(published.to_json()).to_dict() == published.to_dict()


def test_publishing_an_existing_version_fails_and_changes_nothing(store, tmp_path):
    publish(store, tmp_path, "v1")
    before = (version_dir(store, "gan", "v1") / "generate.onnx").read_bytes()
    with pytest.raises(VersionExists, match="immutable"):
        store.publish(make_source(tmp_path, b"other"), make_manifest("v1"))
    assert (version_dir(store, "gan", "v1") / "generate.onnx").read_bytes() == before
    store.load("gan@v1")


def test_invalid_names_and_refs_are_refused(store, tmp_path):
    with pytest.raises(StoreError, match="invalid model name"):
        store.publish(make_source(tmp_path), make_manifest("v1", model="../evil"))
    for ref in ("../gan", "gan@..", "gan@a/b", ".staging@x"):
        with pytest.raises(StoreError):
            store.load(ref)


# ---- atomicity -----------------------------------------------------------------------------------

def test_publish_failing_midway_leaves_no_visible_version(store, tmp_path, monkeypatch):
    import model_store.backend as backend

    real, calls = backend._write_durable, []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(backend, "_write_durable", failing)
    with pytest.raises(OSError, match="disk full"):
        publish(store, tmp_path, "v1")
    assert store.versions("gan") == [] and not version_dir(store, "gan", "v1").exists()
    assert store.backend.list_dir(STAGING) == []      # cleaned up on the way out
    with pytest.raises(NotFound):
        store.load("gan@v1")


def test_publish_killed_midway_leaves_no_visible_version(store, tmp_path):
    """A real crash: the publishing process SIGKILLs itself after writing its first file."""
    src = make_source(tmp_path)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import model_store.backend as backend
        from model_store import ModelStore
        from test_model_store import make_manifest
        real = backend._write_durable
        def dying(path, data):
            real(path, data)
            os.kill(os.getpid(), signal.SIGKILL)
        backend._write_durable = dying
        ModelStore.open({store.uri!r}).publish({str(src)!r}, make_manifest("v1"), aliases=("latest",))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert store.versions("gan") == [] and store.aliases("gan") == {}
    leftover = store.backend.list_dir(STAGING)
    assert len(leftover) == 1                          # the half-written publish, out of sight
    assert store.gc() == []                            # too young: might be a publish still running
    assert store.gc(stale_after_s=0) == [f"{STAGING}/{leftover[0]}"]
    assert store.backend.list_dir(STAGING) == []
    publish(store, tmp_path, "v1")                     # and the version can still be published cleanly
    store.load("gan@v1")


def test_concurrent_publishes_of_one_version_leave_exactly_one(store, tmp_path, monkeypatch):
    """Both writers pass the 'exists?' check, then race on rename: one lands, the other gets VersionExists."""
    barrier = threading.Barrier(2, timeout=10)
    real = LocalBackend._promote

    def synchronized(self, staging, target):
        barrier.wait()                   # both have fully staged before either renames
        real(self, staging, target)

    monkeypatch.setattr(LocalBackend, "_promote", synchronized)
    outcomes: list[str] = []

    def writer(payload: bytes) -> None:
        try:
            store.publish(make_source(tmp_path, payload), make_manifest("v1"))
            outcomes.append("ok")
        except VersionExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=writer, args=(p,)) for p in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["exists", "ok"]
    assert store.versions("gan") == ["v1"] and store.backend.list_dir(STAGING) == []
    assert store.load("gan@v1").graph_bytes("generate") in (b"a", b"b")


def _publish_in_process(uri: str, src: str, barrier, results) -> None:
    real = LocalBackend._promote

    def synchronized(self, staging, target):
        barrier.wait()
        real(self, staging, target)

    LocalBackend._promote = synchronized
    try:
        ModelStore.open(uri).publish(Path(src), make_manifest("v1"))
        results.put("ok")
    except VersionExists:
        results.put("exists")


def test_concurrent_publishes_from_two_processes(store, tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2, timeout=20), ctx.Queue()
    procs = [ctx.Process(target=_publish_in_process, args=(store.uri, str(make_source(tmp_path, p)), barrier, results))
             for p in (b"a", b"b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(results.get(timeout=5) for _ in procs) == ["exists", "ok"]
    assert store.versions("gan") == ["v1"]
    store.load("gan@v1")


# ---- aliases -------------------------------------------------------------------------------------

def test_aliases_move_and_resolve(store, tmp_path):
    publish(store, tmp_path, "v1")
    publish(store, tmp_path, "v2")
    assert store.resolve("gan") == ("gan", "v2")
    store.set_alias("gan", "stable", "v1")
    assert store.resolve("gan@stable") == ("gan", "v1") and store.resolve("gan@v2") == ("gan", "v2")
    store.set_alias("gan", "stable", "v2")
    assert store.aliases("gan") == {"latest": "v2", "stable": "v2"}
    with pytest.raises(NotFound, match="no such version"):
        store.set_alias("gan", "stable", "v9")
    with pytest.raises(StoreError, match="is a version name"):
        store.set_alias("gan", "v1", "v2")
    store.delete_alias("gan", "stable")
    with pytest.raises(NotFound, match="no version or alias 'stable'"):
        store.resolve("gan@stable")
    assert not [p for p in (Path(store.uri) / "gan" / ".aliases").iterdir() if p.name.endswith(".tmp")]


def test_readers_never_see_a_half_moved_alias(store, tmp_path):
    publish(store, tmp_path, "v1")
    publish(store, tmp_path, "v2")
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(store.resolve("gan@stable")[1])
            except Exception as exc:  # noqa: BLE001 - any failure is the bug under test
                errors.append(exc)

    store.set_alias("gan", "stable", "v1")
    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        store.set_alias("gan", "stable", "v2" if i % 2 else "v1")
    stop.set()
    t.join()
    assert errors == [] and seen <= {"v1", "v2"}


# ---- verification --------------------------------------------------------------------------------

def test_one_flipped_byte_is_refused(store, tmp_path):
    publish(store, tmp_path, "v1")
    path = version_dir(store, "gan", "v1") / "generate.onnx"
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="generate.onnx does not match its manifest hash"):
        store.load("gan@v1")


def test_missing_and_unlisted_files_are_refused(store, tmp_path):
    publish(store, tmp_path, "v1")
    vdir = version_dir(store, "gan", "v1")
    (vdir / "sneaky.onnx").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="not in the manifest"):
        store.load("gan@v1")
    (vdir / "sneaky.onnx").unlink()
    (vdir / "extra" / "notes.txt").unlink()
    with pytest.raises(IntegrityError, match="missing files"):
        store.load("gan@v1")


def _rewrite_manifest(vdir: Path, edit) -> None:
    data = json.loads((vdir / "manifest.json").read_text())
    edit(data)
    (vdir / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/hostname", "extra/../../outside.bin", "./generate.onnx"])
def test_manifest_paths_escaping_the_version_are_refused(store, tmp_path, bad):
    publish(store, tmp_path, "v1")
    vdir = version_dir(store, "gan", "v1")
    _rewrite_manifest(vdir, lambda d: d["files"].update({bad: {"sha256": "0" * 64, "size": 1}}))
    with pytest.raises(IntegrityError, match="escapes the version folder"):
        store.load("gan@v1")


def test_symlink_escaping_the_version_is_refused(store, tmp_path):
    publish(store, tmp_path, "v1")
    vdir = version_dir(store, "gan", "v1")
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"graph-bytes")            # same bytes, so only the link itself can be refused
    (vdir / "generate.onnx").unlink()
    (vdir / "generate.onnx").symlink_to(outside)
    with pytest.raises(IntegrityError, match="escapes the version folder"):
        store.load("gan@v1")


def test_symlinked_version_folder_is_refused(store, tmp_path):
    publish(store, tmp_path, "v1")
    elsewhere = tmp_path / "elsewhere"
    version_dir(store, "gan", "v1").rename(elsewhere)
    version_dir(store, "gan", "v1").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(IntegrityError, match="escapes the version folder"):
        store.load("gan@v1")


def test_manifest_naming_another_version_is_refused(store, tmp_path):
    publish(store, tmp_path, "v1")
    _rewrite_manifest(version_dir(store, "gan", "v1"), lambda d: d.update(version="v0"))
    with pytest.raises(IntegrityError, match="manifest says gan@v0"):
        store.load("gan@v1")


# ---- gc ------------------------------------------------------------------------------------------

def test_gc_keeps_what_aliases_point_to(store, tmp_path):
    for i in (1, 2, 3, 4):
        publish(store, tmp_path, f"v{i}", created_at=f"2026-01-0{i}T00:00:00+00:00")
    store.set_alias("gan", "stable", "v1")                # latest -> v4
    assert store.gc(keep_recent=1, dry_run=True) == ["gan@v3", "gan@v2"]
    assert store.versions("gan") == ["v1", "v2", "v3", "v4"]   # dry run removed nothing
    assert store.gc(keep_recent=1) == ["gan@v3", "gan@v2"]
    assert store.versions("gan") == ["v1", "v4"]
    store.load("gan@stable")
    store.load("gan@latest")
    assert store.gc() == []


# ---- backends and defaults -----------------------------------------------------------------------

def test_backend_choice_by_uri(tmp_path, monkeypatch):
    assert isinstance(open_backend(f"file://{tmp_path}"), LocalBackend)
    assert open_backend(f"file://{tmp_path}").root == tmp_path
    with pytest.raises(StoreError, match="unknown model store URI scheme nosuch://"):
        ModelStore.open("nosuch://bucket/models")
    monkeypatch.setenv("GENSERVE_STORE", str(tmp_path / "env-store"))
    assert ModelStore.open().uri == str(tmp_path / "env-store")
    monkeypatch.delenv("GENSERVE_STORE")
    assert ModelStore.open().uri == str(Path("./model_store_data").absolute())


# ---- CLI -----------------------------------------------------------------------------------------

def test_store_cli(store, tmp_path, capsys):
    publish(store, tmp_path, "v1", created_at="2026-01-01T00:00:00+00:00")
    publish(store, tmp_path, "v2", created_at="2026-01-02T00:00:00+00:00")
    s = ["--store", store.uri]
    run_cli("store", "ls", *s)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["gan", "v1"] and out[1].split()[:4] == ["gan", "v2", "2026-01-02T00:00:00+00:00", "latest"]
    assert "fd=12.5" in out[1]
    run_cli("store", "show", "gan@latest", *s)
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v2" and shown["aliases"] == ["latest"] and shown["graphs"][0]["graph"] == "generate"
    run_cli("store", "alias", "gan", "stable", "v1", *s)
    run_cli("store", "alias", "gan", *s)
    assert capsys.readouterr().out.splitlines()[-2:] == ["gan@latest -> v2", "gan@stable -> v1"]
    run_cli("store", "verify", *s)
    assert capsys.readouterr().out.count("ok ") == 2
    path = version_dir(store, "gan", "v1") / "generate.onnx"
    path.write_bytes(b"X" + path.read_bytes()[1:])
    with pytest.raises(IntegrityError, match="1 of 2 version"):
        run_cli("store", "verify", *s)
    assert "FAILED" in capsys.readouterr().out
    run_cli("store", "alias", "gan", "stable", "--delete", *s)
    run_cli("store", "gc", "--dry-run", *s)
    assert "would remove gan@v1" in capsys.readouterr().out
    run_cli("store", "gc", *s)
    assert store.versions("gan") == ["v2"]
