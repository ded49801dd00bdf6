"""PixelCNN through the step engine: the step graph's per-row pixel, classifier-free guidance as rows, and
the same images as the offline sampler (families.pixelcnn.sample) for the same (seed, class, settings)."""
import numpy as np
import pytest
import torch

from core.contracts import NULL_CLASS, contracts_for
from families import pixelcnn
from serving.engine import EngineCore, PixelCNNRequest, PixelCNNStepper, TorchRunner

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> pixelcnn.PixelCNN:
    torch.manual_seed(0)
    net = pixelcnn.build(pixelcnn.Config(hidden=8, dilations=(1, 2))).eval()
    with torch.no_grad():  # random everywhere, so the class and the null branch differ visibly
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


class Recorder(TorchRunner):
    """A TorchRunner that keeps each forward's y and p."""

    def __init__(self, fn):
        super().__init__(fn)
        self.calls = []

    def execute(self, x, y, p):
        self.calls.append((y.tolist(), p.tolist()))
        return super().execute(x, y, p)


def serve(runner, arrivals: dict[int, list]) -> dict[str, torch.Tensor]:
    """Step an engine until idle; arrivals[k] = [(id, request)] join before step k."""
    core, outputs, k = EngineCore(PixelCNNStepper(runner)), {}, 0
    while core.has_work() or arrivals:
        for rid, request in arrivals.pop(k, []):
            core.add_request(request, rid)
        outputs |= {o.request_id: o.result() for o in core.step()}
        k += 1
    return outputs


MIX = {"a": (0, PixelCNNRequest(class_id=2, seed=11, n=2, temperature=0.9, guidance_scale=2.0)),
       "b": (0, PixelCNNRequest(class_id=NULL_CLASS, seed=12, guidance_scale=2.0)),   # nothing to guide to
       "c": (200, PixelCNNRequest(class_id=5, seed=13, temperature=1.2))}


def offline(model, r: PixelCNNRequest) -> torch.Tensor:
    return pixelcnn.sample(model, torch.full((r.n,), r.class_id), torch.Generator().manual_seed(r.seed),
                           temperature=r.temperature, guidance_scale=r.guidance_scale)


def test_guided_images_take_a_null_class_row_each_in_the_same_forward(model):
    assert [r.rows for _, r in MIX.values()] == [4, 1, 1]
    runner = Recorder(model.step)
    arrivals = {}
    for rid, (k, r) in MIX.items():
        arrivals.setdefault(k, []).append((rid, r))
    serve(runner, arrivals)
    assert len(runner.calls) == 200 + 784
    assert runner.calls[0] == ([2, 2, NULL_CLASS, NULL_CLASS, NULL_CLASS], [0] * 5)
    assert runner.calls[200] == ([2, 2, NULL_CLASS, NULL_CLASS, NULL_CLASS, 5], [200] * 5 + [0])


def test_the_engine_serves_the_offline_samplers_images(model):
    """Mixed positions, guidance and temperatures in one batch; each request's images are those
    families.pixelcnn.sample draws for its (seed, class, temperature, guidance)."""
    arrivals = {}
    for rid, (k, r) in MIX.items():
        arrivals.setdefault(k, []).append((rid, r))
    served = serve(TorchRunner(model.step), arrivals)
    for rid, (_, r) in MIX.items():
        assert torch.equal(served[rid], offline(model, r)), rid


def test_the_onnx_step_graph_serves_the_same_images(model, tmp_path):
    from core.runtime import ProviderChoice, make_session
    from exporters.onnx_export import export_family
    from serving.engine import OnnxRunner

    graphs = export_family("pixelcnn", model, {}, tmp_path, optimize=False, threads=1, batches=(3,))
    step = next(g for g in graphs if g.contract.graph == "step")
    assert step.contract == contracts_for("pixelcnn", {})[0]
    runner = OnnxRunner(make_session(step.path, threads=1, choice=ProviderChoice(["CPUExecutionProvider"], "test")),
                        step.contract)
    _, r = MIX["a"]
    np.testing.assert_array_equal(serve(runner, {0: [("a", r)]})["a"].numpy(), offline(model, r).numpy())

