"""What a replica runs: a served model's graphs, loaded from the model store (every hash verified) into
ONNX Runtime sessions on the providers core.runtime chooses (TensorRT -> CUDA -> CPU)."""

from serving.runtime.sessions import (GraphSession, LoadedModel, Threads, load_model, node_address, replica_cpus,
                                      threads_for)

__all__ = ["GraphSession", "LoadedModel", "Threads", "load_model", "node_address", "replica_cpus", "threads_for"]
