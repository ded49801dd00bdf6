"""KServe v2 InferParameter <-> Python values, for both sides of the gRPC protocol (the server's
serving/api/kserve_grpc.py and the load generator's client)."""
from __future__ import annotations


def parameter_value(p) -> object:
    """An InferParameter's value (bool, int, str or float), None when unset."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def set_parameter(p, value: object) -> None:
    """Set an InferParameter from a Python scalar: bool, int (int64), float (double), else its str."""
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)
