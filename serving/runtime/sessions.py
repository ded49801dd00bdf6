"""A thin layer over core.runtime for serving: load `name@version|alias` from the store (hashes
verified), open ONNX Runtime sessions on the graph the model samples with and on the graphs of its
family's own operations (vae.encode, flow.log_prob) where asked, from the verified bytes, and feed them
by contract.

Imports numpy, onnxruntime, exporters, model_store and serving.observability (a no-op outside a Ray
worker): never families/ or torch."""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from core.contracts import GraphContract
from core.runtime import ProviderChoice, choose_providers, make_session, tensorrt_provider_options
from model_store.errors import IntegrityError
from model_store.manifest import Manifest
from model_store.store import ModelStore
from serving.observability import record_model_load, record_verification_failure
from serving.runtime.cores import NodeCores, sharing_enabled, usable_cores


def replica_cpus() -> float | None:
    """CPUs Ray granted this replica (ray_actor_options.num_cpus)."""
    import ray

    return ray.get_runtime_context().get_assigned_resources().get("CPU")


def _ray_node_id() -> str | None:
    """The Ray node this process runs on, None outside a Ray worker (benchmarks, tests, exporters)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def node_address() -> str:
    """The IP address of the Ray node this replica runs on: which host served a request, in its answer."""
    import ray

    return ray.util.get_node_ip_address()


@dataclass(frozen=True)
class Threads:
    """ONNX Runtime intra-op threads of a replica's sessions: `reserved` always, `node` while no other replica
    on the node is busy (serving.runtime.cores); equal when the cores are not shared."""

    reserved: int
    node: int

    @property
    def shared(self) -> bool:
        return self.node > self.reserved


def threads_for(num_cpus: float | None) -> Threads:
    """Threads for a replica granted num_cpus CPUs (its ray_actor_options): one per whole CPU reserved, at
    least one; and, with GENSERVE_SHARE_CORES=1, the node's usable cores for when it is alone."""
    reserved = 1 if num_cpus is None or not math.isfinite(num_cpus) else max(1, int(num_cpus + 1e-9))
    return Threads(reserved, max(reserved, usable_cores()) if sharing_enabled() else reserved)


class GraphSession:
    """One graph's session, fed in its contract's names and dtypes; with `wide` and `cores`, the wide session
    runs the forwards that find the node's other replicas idle (serving.runtime.cores)."""

    def __init__(self, session: ort.InferenceSession, contract: GraphContract, *,
                 wide: ort.InferenceSession | None = None, cores: NodeCores | None = None):
        self.session, self.contract = session, contract
        self.wide, self.cores = wide, cores
        self.wide_runs = self.runs = 0  # how often the node was free: benchmarks and tests read these
        self._dtypes = {spec.name: np.dtype(spec.dtype) for spec in contract.inputs}
        self._output = contract.outputs[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The first output for a batch of inputs (name -> [B, ...]). Blocking: call it off the event loop."""
        if set(feeds) != set(self._dtypes):
            raise ValueError(f"{self.contract.key} takes inputs {sorted(self._dtypes)}, got {sorted(feeds)}")
        cast = {name: np.ascontiguousarray(a, dtype=self._dtypes[name]) for name, a in feeds.items()}
        if self.cores is None:
            return self.session.run([self._output], cast)[0]
        session = self.wide if self.wide is not None and self.cores.alone() else self.session
        self.runs += 1
        self.wide_runs += session is self.wide
        with self.cores.busy():
            return session.run([self._output], cast)[0]


@dataclass
class LoadedModel:
    """A served model version with a live session on the graph it samples with."""

    manifest: Manifest
    graph: GraphSession
    providers: ProviderChoice              # what ONNX Runtime runs on, and why
    threads: Threads                       # intra-op threads of its sessions
    extra: dict[str, GraphSession] = field(default_factory=dict)  # graph name -> session: operations' graphs

    @property
    def name(self) -> str:
        return self.manifest.model

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def family(self) -> str:
        return self.manifest.family


def load_model(store: str | None, ref: str, graph_for: Mapping[str, str], *, threads: int | Threads = 1,
               extra_graphs: Mapping[str, Sequence[str]] | None = None, choice: ProviderChoice | None = None,
               max_batch: int = 64) -> LoadedModel:
    """Load ref ("gan", "gan@3f2a…", "gan@stable") from the store at `store` (None: $GENSERVE_STORE, else
    ./model_store_data), verifying every file, and open a session on the graph graph_for[family] from the
    verified bytes, and one on each graph of extra_graphs[family] (e.g. {"vae": ["encode"]}). max_batch
    bounds TensorRT's optimization profile (unused on CPU). Raises ValueError for a family not in
    graph_for, model_store's NotFound / IntegrityError otherwise."""
    start = time.perf_counter()
    try:
        loaded = ModelStore.open(store).load(ref)
    except IntegrityError:
        record_verification_failure(ref.partition("@")[0])
        raise
    family = loaded.manifest.family
    if family not in graph_for:
        raise ValueError(f"{ref} is a {family} model; this deployment serves {', '.join(graph_for)}")
    choice = choice or choose_providers()
    threads = threads if isinstance(threads, Threads) else Threads(threads, threads)
    on_cpu = choice.providers[0] == "CPUExecutionProvider"
    # a node's cores are shared only on CPU (an accelerator's sessions do not contend for them) and in a replica
    cores = NodeCores(_ray_node_id()) if on_cpu and threads.shared and _ray_node_id() else None

    def open_graph(name: str) -> GraphSession:
        contract = loaded.manifest.graph(name)
        options = ({"TensorrtExecutionProvider": tensorrt_provider_options(contract, max_batch=max_batch)}
                   if "TensorrtExecutionProvider" in choice.providers else None)
        try:  # make_session refuses a graph that is not self-contained (ValueError) before ORT opens it
            graph = loaded.graph_bytes(name)
            session = make_session(graph, threads=threads.reserved, choice=choice, provider_options=options)
            wide = make_session(graph, threads=threads.node, choice=choice) if cores else None
        except ValueError as exc:
            record_verification_failure(loaded.manifest.model)
            raise IntegrityError(f"{loaded.manifest.model}@{loaded.manifest.version}, {contract.onnx_file}: {exc}; "
                                 "refusing to load") from None
        return GraphSession(session, contract, wide=wide, cores=cores)

    graph = open_graph(graph_for[family])
    extra = {name: open_graph(name) for name in (extra_graphs or {}).get(family, ())}
    record_model_load(loaded.manifest.model, time.perf_counter() - start)
    return LoadedModel(loaded.manifest, graph, choice, threads, extra)
