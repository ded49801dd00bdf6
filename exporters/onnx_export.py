"""torch -> ONNX for every graph of a family: export, check against its contract, optimize offline,
and prove parity with torch before anything is published."""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from core.contracts import BATCH, GraphContract, sample_inputs
from exporters.graphs import graph_contracts, graph_module
from exporters.profile import time_call
from core.runtime import ProviderChoice, make_session

PARITY_BATCHES = (1, 37)     # 37: odd, so no kernel gets a tidy power-of-two batch
PARITY_ATOL = 1e-4           # fp32 max absolute error, ORT vs torch
_CPU = ProviderChoice(["CPUExecutionProvider"], "parity and export checks run on CPU: fp32 reference")
_ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}


class ContractError(ValueError):
    """An exported graph does not match its contract."""


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with torch beyond tolerance: the graph must not ship."""


@dataclass
class OptimizationReport:
    """What ONNX Runtime's offline BASIC optimizations bought for one graph. BASIC rewrites (constant
    folding, redundant-node removal, Conv+Add/BN fusions) are provider-independent, so the saved graph
    still runs on TensorRT and CUDA; EXTENDED would bake in CPU-only contrib ops."""

    applied: bool              # False when it removed nothing, so the plain export shipped
    nodes_before: int
    nodes_after: int
    load_ms_before: float      # session creation with ORT's default online optimizations: the offline
    load_ms_after: float       # pass saves redoing BASIC rewrites at every replica start
    ms_before: float           # ms per forward at `batch` with ORT's online optimizations off,
    ms_after: float            # i.e. the graph as written, before vs after the offline pass
    batch: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportedGraph:
    contract: GraphContract
    path: Path
    parity: dict[int, float]   # batch -> max abs error of the shipped graph vs torch
    optimization: OptimizationReport | None


def export_onnx(module: nn.Module, contract: GraphContract, path: Path) -> None:
    """TorchScript-based exporter (dynamo=False): traces these small static-shape models reliably and
    needs no onnxscript; every input and output gets the dynamic axis BATCH."""
    example = sample_inputs(contract, 2, np.random.default_rng(0))
    args = tuple(torch.from_numpy(example[t.name]) for t in contract.inputs)
    axes = {t.name: {0: BATCH} for t in (*contract.inputs, *contract.outputs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning and tracer notes
        torch.onnx.export(module.eval(), args, str(path), input_names=[t.name for t in contract.inputs],
                          output_names=[t.name for t in contract.outputs], dynamic_axes=axes,
                          opset_version=contract.opset, do_constant_folding=True, dynamo=False)
    _stamp_output_shapes(path, contract)


def _stamp_output_shapes(path: Path, contract: GraphContract) -> None:
    """The tracer leaves some output dims symbolic (e.g. 'Slicemu_dim_1' after a chunk); write the
    contract's fixed sizes so consumers (TensorRT, serving) see static shapes. check_parity then confirms
    the real outputs have exactly these shapes."""
    model = onnx.load(str(path))
    for value, spec in zip(model.graph.output, contract.outputs):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in spec.shape:
            dim = dims.add()
            if d == BATCH:
                dim.dim_param = BATCH
            else:
                dim.dim_value = int(d)
    onnx.save(model, str(path))


def check_graph(path: Path, contract: GraphContract) -> onnx.ModelProto:
    """onnx.checker, then the contract: input/output names in order, dtypes, fixed dims, dynamic batch."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    for kind, got, want in (("input", model.graph.input, contract.inputs), ("output", model.graph.output, contract.outputs)):
        names = [v.name for v in got]
        if names != [t.name for t in want]:
            raise ContractError(f"{contract.key}: {kind}s {names}, contract says {[t.name for t in want]}")
        for value, spec in zip(got, want):
            ttype = value.type.tensor_type
            if ttype.elem_type != _ONNX_DTYPES[spec.dtype]:
                raise ContractError(f"{contract.key}: {kind} {spec.name} has ONNX elem_type {ttype.elem_type}, "
                                    f"contract says {spec.dtype}")
            dims = [d.dim_param or d.dim_value for d in ttype.shape.dim]
            if dims != list(spec.shape):
                raise ContractError(f"{contract.key}: {kind} {spec.name} has shape {dims}, contract says {list(spec.shape)}")
    return model


def check_parity(module: nn.Module, contract: GraphContract, path: Path, *, batches: Sequence[int] = PARITY_BATCHES,
                 atol: float = PARITY_ATOL, threads: int | None = None, seed: int = 0) -> dict[int, float]:
    """Max abs error per batch size, ORT (CPU, fp32) vs torch on the same random in-domain inputs."""
    session = make_session(path, threads=threads, choice=_CPU)
    rng = np.random.default_rng(seed)
    errors: dict[int, float] = {}
    for batch in batches:
        feeds = sample_inputs(contract, batch, rng)
        with torch.no_grad():
            ref = module.eval()(*(torch.from_numpy(feeds[t.name]) for t in contract.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = session.run([t.name for t in contract.outputs], feeds)
        err = 0.0
        for spec, r, g in zip(contract.outputs, ref, got):
            if tuple(g.shape) != spec.concrete_shape(batch):
                raise ContractError(f"{contract.key}: output {spec.name} has shape {g.shape} at batch {batch}, "
                                    f"contract says {spec.concrete_shape(batch)}")
            err = max(err, float(np.max(np.abs(r.numpy().astype(np.float64) - g.astype(np.float64)))))
        if not np.isfinite(err) or err > atol:
            raise ParityError(f"{contract.key}: ONNX Runtime vs torch max abs error {err:.3g} at batch {batch} "
                              f"exceeds {atol:g}; {path} must not ship")
        errors[batch] = err
    return errors


def _load_ms(path: Path, threads: int | None) -> float:
    return time_call(lambda: make_session(path, threads=threads, choice=_CPU), warmup=0, min_runs=3, budget_s=0.2)


def _forward_ms(path: Path, contract: GraphContract, batch: int, threads: int | None) -> float:
    session = make_session(path, threads=threads, choice=_CPU, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    feeds = sample_inputs(contract, batch, np.random.default_rng(0))
    return time_call(lambda: session.run(None, feeds), min_runs=3, budget_s=0.3)


def optimize_offline(raw: Path, out: Path, contract: GraphContract, *, threads: int | None = None,
                     batch: int = 8) -> OptimizationReport:
    """Write ORT's BASIC-optimized graph to `out` (or a copy of `raw` when it removed nothing) and measure it."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    ort.InferenceSession(str(raw), sess_options=so, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(out))
    # ORT declares every domain it knows (com.microsoft, training, ...); keep only those nodes use, so the
    # graph reads as plain ONNX to other consumers such as TensorRT's parser.
    used = {n.domain for n in optimized.graph.node} | {""}
    kept = [o for o in optimized.opset_import if o.domain in used]
    del optimized.opset_import[:]
    optimized.opset_import.extend(kept)
    onnx.save(optimized, str(out))
    before = len(onnx.load(str(raw)).graph.node)
    after = len(optimized.graph.node)
    applied = after < before
    if not applied:
        out.write_bytes(raw.read_bytes())
    return OptimizationReport(applied, before, after, round(_load_ms(raw, threads), 2), round(_load_ms(out, threads), 2),
                              round(_forward_ms(raw, contract, batch, threads), 3),
                              round(_forward_ms(out, contract, batch, threads), 3), batch)


def export_family(family: str, model: nn.Module, config: dict[str, Any], out_dir: Path, *, optimize: bool = True,
                  threads: int | None = None, batches: Sequence[int] = PARITY_BATCHES,
                  atol: float = PARITY_ATOL) -> list[ExportedGraph]:
    """Every graph of one family into out_dir/<graph>.onnx, checked and parity-tested; intermediate files
    are removed so out_dir holds exactly what ships."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = []
    for contract in graph_contracts(family, config):
        module = graph_module(contract, model).eval()
        final = out_dir / contract.onnx_file
        raw = out_dir / f"{contract.graph}.raw.onnx" if optimize else final
        export_onnx(module, contract, raw)
        check_graph(raw, contract)
        report = None
        if optimize:
            report = optimize_offline(raw, final, contract, threads=threads)
            raw.unlink()
            check_graph(final, contract)
        parity = check_parity(module, contract, final, batches=batches, atol=atol, threads=threads)
        exported.append(ExportedGraph(contract, final, parity, report))
    return exported
