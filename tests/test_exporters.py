"""Exporters: every graph of every family exports, matches its contract and agrees with torch; the runtime
picks providers by what the machine has; TensorRT says clearly why it is unavailable where it is, and builds
and runs engines where it is not (those tests are @pytest.mark.gpu: tests/conftest.py skips them without an
NVIDIA GPU)."""
from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core import contracts as C
from core.contracts import BATCH, GraphContract, contracts_for, sample_inputs
from exporters.graphs import FlowSample, graph_module
from exporters.onnx_export import ContractError, ParityError, check_graph, check_parity, export_family, export_onnx
from core.runtime import choose_providers, gpu_present, make_session, tensorrt_provider_options
from exporters.tensorrt import BatchProfile, TensorRTUnavailable, build_engine, time_engine, unavailable_reason
from families.checkpoint import config_to_dict
from families.registry import FAMILIES, get_family

torch.set_num_threads(1)

# Tiny widths: the graphs' structure (and so the export paths) is the same as the shipped sizes.
SMALL = {"gan": dict(g_width=16, z_dim=32), "vae": dict(width=8, latent_dim=4),
         "flow": dict(hidden=8, couplings_per_stage=1), "pixelcnn": dict(hidden=8, dilations=(1, 2)),
         "diffusion": dict(channels=(8, 16, 16), emb_dim=16)}


def tiny_model(family: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """A small random model; every weight is perturbed, so zero-initialised output layers (flow,
    diffusion) do not make parity trivially exact."""
    spec = get_family(family)
    config = spec.Config(**SMALL[family])
    torch.manual_seed(seed)
    model = spec.build(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, config_to_dict(config)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, list]]:
    out = {}
    for family in FAMILIES:
        model, config = tiny_model(family)
        out[family] = (model, export_family(family, model, config, tmp_path_factory.mktemp(family), threads=1))
    return out


GRAPHS = [(f, c.graph) for f in FAMILIES for c in contracts_for(f, config_to_dict(get_family(f).Config(**SMALL[f])))]


def _graph(exported, family, graph):
    model, graphs = exported[family]
    return model, next(g for g in graphs if g.contract.graph == graph)


@pytest.mark.parametrize("family,graph", GRAPHS, ids=[f"{f}.{g}" for f, g in GRAPHS])
def test_parity_at_batch_1_and_37(exported, family, graph):
    _, g = _graph(exported, family, graph)
    assert set(g.parity) == {1, 37}
    assert max(g.parity.values()) <= 1e-4
    assert g.optimization is not None and g.optimization.nodes_after <= g.optimization.nodes_before


@pytest.mark.parametrize("family,graph", GRAPHS, ids=[f"{f}.{g}" for f, g in GRAPHS])
def test_graph_matches_its_contract(exported, family, graph):
    model, g = _graph(exported, family, graph)
    proto = check_graph(g.path, g.contract)
    assert {n.domain for n in proto.graph.node} <= {""}          # portable: no ORT contrib ops
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", C.OPSET)] and C.OPSET >= 17
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == BATCH
    session = make_session(g.path, threads=1)
    assert [i.name for i in session.get_inputs()] == [t.name for t in g.contract.inputs]
    assert [o.name for o in session.get_outputs()] == [t.name for t in g.contract.outputs]
    for batch in (3, 8):  # batches never seen at export or parity time
        outputs = session.run(None, sample_inputs(g.contract, batch, np.random.default_rng(batch)))
        for spec, value in zip(g.contract.outputs, outputs):
            assert value.shape == spec.concrete_shape(batch) and value.dtype == np.dtype(spec.dtype)
            assert np.isfinite(value).all()
            if spec.domain is C.Domain.UNIT:
                assert value.min() >= 0.0 and value.max() <= 1.0
            if spec.domain is C.Domain.SIGNED:
                assert value.min() >= -1.0 and value.max() <= 1.0


def test_contracts_cover_every_family_and_read_sizes_from_the_config():
    assert {f: [c.graph for c in contracts_for(f, {})] for f in FAMILIES} == {
        "vae": ["decode", "encode"], "gan": ["generate"], "flow": ["sample", "log_prob"],
        "pixelcnn": ["step", "logits"], "diffusion": ["denoise"]}
    gan = contracts_for("gan", {"z_dim": 32})[0]
    assert gan.inputs[0].shape == (BATCH, 32) and gan.inputs[1].dtype == "int64"
    den = contracts_for("diffusion", {})[0]
    assert [(t.name, t.dtype) for t in den.inputs] == [("x", "float32"), ("t", "int64"), ("y", "int64")]
    for family in FAMILIES:
        for c in contracts_for(family, {}):
            assert GraphContract.from_dict(c.to_dict()) == c
            assert all(t.shape[0] == BATCH for t in (*c.inputs, *c.outputs))
    with pytest.raises(ValueError, match="image_size"):
        contracts_for("flow", {"image_size": 32})


def test_flow_latent_contract_matches_the_model():
    flow = get_family("flow").build(get_family("flow").Config(hidden=8, couplings_per_stage=1))
    assert [tuple(s) for s in flow.latent_shapes()] == [s for _, s in C.FLOW_LATENTS]


def test_sample_inputs_stay_in_domain():
    y = sample_inputs(contracts_for("diffusion", {})[0], 4000, np.random.default_rng(0))
    assert y["y"].min() == 0 and y["y"].max() == C.NULL_CLASS        # includes the "no class" id
    assert y["t"].min() >= 0 and y["t"].max() < C.NUM_TRAIN_TIMESTEPS
    px = sample_inputs(contracts_for("pixelcnn", {})[0], 2, np.random.default_rng(0))["x"]
    assert px.dtype == np.float32 and np.array_equal(px, np.round(px)) and px.max() <= 255


def test_pixelcnn_step_graph_reads_the_logits_graph_at_each_rows_pixel(exported):
    """The served step graph returns exactly what the likelihood graph has at each row's own pixel p: the
    mixture parameters (3K per pixel, K from the config), whose log-probabilities serving computes."""
    _, step = _graph(exported, "pixelcnn", "step")
    _, full = _graph(exported, "pixelcnn", "logits")
    width = 3 * get_family("pixelcnn").Config(**SMALL["pixelcnn"]).mixtures
    assert step.contract.outputs[0].shape == (BATCH, width)
    feeds = sample_inputs(step.contract, 5, np.random.default_rng(1))
    got = make_session(step.path, threads=1).run(None, feeds)[0]                          # [5, 3K]
    mixture = make_session(full.path, threads=1).run(None, {k: feeds[k] for k in ("x", "y")})[0]
    assert mixture.shape == (5, width, 28, 28)
    np.testing.assert_allclose(got, mixture.reshape(5, width, -1)[np.arange(5), :, feeds["p"]], atol=1e-5)
    assert feeds["p"].min() >= 0 and feeds["p"].max() < C.NUM_PIXELS


def test_flow_sample_latent_order_is_z1_z2_z3():
    model, _ = tiny_model("flow")
    z = torch.randn(3, C.NUM_PIXELS)
    y = torch.tensor([0, 5, C.NULL_CLASS])
    z1, z2, z3 = z[:, :392].reshape(3, 2, 14, 14), z[:, 392:588].reshape(3, 4, 7, 7), z[:, 588:].reshape(3, 4, 7, 7)
    torch.testing.assert_close(FlowSample(model)(z, y), model.sample_from_latents([z1, z2, z3], y))


def test_parity_failure_is_an_error(tmp_path):
    model, config = tiny_model("vae")
    contract = contracts_for("vae", config)[0]
    export_onnx(graph_module(contract, model), contract, tmp_path / "decode.onnx")
    with torch.no_grad():
        model.decoder.fc[0].bias.add_(1.0)                 # torch moves on, the graph does not
    with pytest.raises(ParityError, match="vae.decode: ONNX Runtime vs torch max abs error"):
        check_parity(graph_module(contract, model), contract, tmp_path / "decode.onnx", threads=1)


def test_contract_mismatch_is_an_error(tmp_path):
    model, config = tiny_model("gan")
    contract = contracts_for("gan", config)[0]
    export_onnx(model, contract, tmp_path / "g.onnx")
    renamed = GraphContract(contract.family, contract.graph, (contract.inputs[1], contract.inputs[0]), contract.outputs)
    with pytest.raises(ContractError, match="inputs"):
        check_graph(tmp_path / "g.onnx", renamed)
    wrong = contracts_for("gan", {"z_dim": 7})[0]
    with pytest.raises(ContractError, match="shape"):
        check_graph(tmp_path / "g.onnx", wrong)
    assert onnx.load(str(tmp_path / "g.onnx")).graph.output[0].name == "x"


# ---- runtime provider choice and TensorRT --------------------------------------------------------

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
TENSORRT_HERE = unavailable_reason() is None


def test_this_machine_gets_the_providers_it_has_and_says_why():
    choice = choose_providers()
    if gpu_present() and set(GPU_PROVIDERS) & set(ort.get_available_providers()):
        assert choice.providers[0] in GPU_PROVIDERS and choice.providers[-1] == "CPUExecutionProvider"
        assert choice.reason.startswith("GPU found")
    else:
        assert choice.providers == ["CPUExecutionProvider"]
        assert choice.reason.startswith("CPU: ")


@pytest.mark.parametrize("available,gpu,expected,reason", [
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], True,
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "GPU found"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], True, ["CUDAExecutionProvider", "CPUExecutionProvider"], "GPU found"),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], False, ["CPUExecutionProvider"],
     "no NVIDIA GPU is visible"),
    (["CPUExecutionProvider"], True, ["CPUExecutionProvider"], "install onnxruntime-gpu"),
])
def test_provider_order_is_tensorrt_cuda_cpu(available, gpu, expected, reason):
    choice = choose_providers(available, has_gpu=gpu)
    assert choice.providers == expected and reason in choice.reason


def test_tensorrt_provider_profile_covers_the_batch_axis():
    opts = tensorrt_provider_options(contracts_for("gan", {"z_dim": 64})[0], min_batch=1, opt_batch=8, max_batch=64)
    assert opts["trt_profile_min_shapes"] == "z:1x64,y:1"
    assert opts["trt_profile_opt_shapes"] == "z:8x64,y:8"
    assert opts["trt_profile_max_shapes"] == "z:64x64,y:64"


def test_batch_profile_checks_its_order():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(min=4, opt=2, max=8)


@pytest.mark.skipif(TENSORRT_HERE, reason="TensorRT works here: test_tensorrt_builds_and_runs_an_engine covers it")
def test_without_tensorrt_building_says_why(tmp_path):
    assert unavailable_reason()  # no tensorrt package, or no GPU
    with pytest.raises(TensorRTUnavailable, match="TensorRT path skipped: "):
        build_engine(tmp_path / "g.onnx", tmp_path / "g.plan", contracts_for("gan", {})[0])
    assert not (tmp_path / "g.plan").exists()


@pytest.mark.skipif(TENSORRT_HERE, reason="TensorRT works here: the command builds engines instead")
def test_without_tensorrt_the_command_skips_with_the_reason(capsys, tmp_path):
    from exporters.tensorrt import main

    assert main(["--store", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("TensorRT path skipped: ")


# ---- on an NVIDIA GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_a_gpu_session_agrees_with_the_cpu(exported):
    """Where onnxruntime has a GPU provider, sessions run on it and give the CPU's outputs (to fp32 noise)."""
    if not set(GPU_PROVIDERS) & set(ort.get_available_providers()):
        pytest.skip("onnxruntime offers no GPU provider here: pip install onnxruntime-gpu")
    _, g = _graph(exported, "gan", "generate")
    gpu = make_session(g.path, choice=choose_providers())
    assert gpu.get_providers()[0] in GPU_PROVIDERS
    cpu = make_session(g.path, threads=1, choice=choose_providers(has_gpu=False))
    inputs = sample_inputs(g.contract, 8, np.random.default_rng(0))
    np.testing.assert_allclose(gpu.run(None, inputs)[0], cpu.run(None, inputs)[0], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not TENSORRT_HERE, reason=f"TensorRT unavailable: {unavailable_reason()}")
def test_tensorrt_builds_and_runs_an_engine(exported, tmp_path):
    _, g = _graph(exported, "gan", "generate")
    build = build_engine(g.path, tmp_path / "generate.plan", g.contract, profile=BatchProfile(min=1, opt=8, max=16))
    assert build.path.stat().st_size > 0 and build.contract == "gan.generate" and build.gpu
    ms = time_engine(build.path, g.contract, [1, 16], iters=5)
    assert set(ms) == {1, 16} and all(t > 0 for t in ms.values())
