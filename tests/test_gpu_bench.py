"""benchmarks/gpu.py, the GPU path's check: here its CPU fallback in --quick mode, on the real store (the
trained gan and diffusion), so the code the GPU machine will run is exercised on every CI run. On a GPU
machine the same test runs the CUDA path; test_gpu_run_uses_the_gpu (@pytest.mark.gpu) asserts that it did."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu
from model_store import ModelStore


@pytest.fixture(scope="module")
def store(request) -> ModelStore:
    """./model_store_data when it holds gan and diffusion (`genserve build`), else the session's store built
    from the committed checkpoints (tests/conftest.py)."""
    local = ModelStore.open()
    try:
        if {"gan", "diffusion"} <= set(local.models()):
            return local
    except OSError:
        pass
    return request.getfixturevalue("served_store")


@pytest.fixture(scope="module")
def quick_run(store, tmp_path_factory) -> tuple[int, dict, str]:
    out = tmp_path_factory.mktemp("gpu")
    threads = torch.get_num_threads()
    try:
        code = gpu.main(["--store", store.uri, "--out", str(out), "--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return code, json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def test_the_quick_run_passes_and_writes_its_report(quick_run):
    code, result, md = quick_run
    assert code == 0 and result["passed"] and result["mode"] == "quick"
    assert "All checks passed" in md
    if result["environment"]["fallback"]:  # never mistaken for GPU figures
        assert "CPU FALLBACK: not GPU figures" in md and result["environment"]["device"] == "cpu"
        assert set(result["environment"]["unavailable"]) == {"cuda", "tensorrt-fp16"}


def test_parity_passes_for_every_graph_and_provider(quick_run):
    _, result, _ = quick_run
    compared = result["environment"]["compared"]
    seen = {(r["graph"], r["provider"]) for r in result["parity"]}
    assert seen == {(g, p) for g in gpu.QUICK.graphs for p in compared}
    for r in result["parity"]:
        assert r["pass"] and r["scaled"] <= r["tolerance"], r
        if result["environment"]["fallback"]:
            assert r["max_abs_diff"] == 0.0  # CPU vs CPU: the same kernels on the same inputs


def test_rows_per_second_at_every_batch(quick_run):
    _, result, _ = quick_run
    cells = {(r["graph"], r["provider"], r["batch"]): r["rows_per_s"] for r in result["throughput"]}
    for graph in gpu.QUICK.graphs:
        for batch in gpu.QUICK.batches:
            assert cells[(graph, "cpu", batch)] > 0


def test_device_loop_gives_the_engines_images_for_the_same_seeds(quick_run):
    _, result, _ = quick_run
    rows = result["device_loop"]
    variants = {"iobinding", "host-copies"} | ({"cuda-graph"} if not result["environment"]["fallback"] else set())
    got = {(r["sampler"], r["variant"]) for r in rows}
    # a CUDA graph ORT refuses is reported in the notes instead of a row
    assert got | {(s, v) for s in gpu.SAMPLERS for v in result["device_loop_notes"]} >= \
        {(s, v) for s in gpu.SAMPLERS for v in variants}
    for r in rows:
        assert r["pass"] and r["max_diff_levels"] <= gpu.IMAGE_TOL and r["images_per_s"] > 0, r
        if r["device"] == "cpu":
            assert r["max_diff_levels"] == 0  # the engine's own maths and session: bit-identical


@pytest.mark.gpu
def test_gpu_run_uses_the_gpu(quick_run):
    """On a GPU machine with onnxruntime-gpu: the CUDA provider was compared, and the device loop ran on CUDA."""
    _, result, _ = quick_run
    assert not result["environment"]["fallback"], result["environment"]["unavailable"]
    assert "cuda" in result["environment"]["compared"]
    assert {r["device"] for r in result["device_loop"]} == {"cuda:0"}
