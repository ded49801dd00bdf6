"""Safe by construction: nothing unpickles (weights are safetensors, graphs ONNX), and the serving port offers
no way to change the model store."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import http_json

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for pkg in ("core", "families", "exporters", "model_store", "serving", "genserve", "loadtests")
        for p in (ROOT / pkg).rglob("*.py")]


def calls(path: Path) -> list[tuple[str, ast.Call]]:
    """(dotted name, call) of every call in the file, e.g. ("torch.load", ...)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f, parts = node.func, []
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                parts.append(f.id)
            out.append((".".join(reversed(parts)), node))
    return out


def test_nothing_unpickles():
    unsafe = {"torch.load", "pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
              "dill.load", "dill.loads", "marshal.loads", "shelve.open"}
    found = []
    for path in CODE:
        for name, call in calls(path):
            allow_pickle = any(k.arg == "allow_pickle" and getattr(k.value, "value", False) is True
                               for k in call.keywords)
            if name in unsafe or (name.endswith("np.load") and allow_pickle):
                found.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}")
    assert found == []
    assert len(CODE) > 100   # the scan saw the tree


def test_the_serving_port_has_no_store_management(server):
    status, doc = http_json("GET", f"{server['url']}/openapi.json")
    assert status == 200
    assert not [p for p in doc["paths"] if "store" in p or "alias" in p or "publish" in p]
    for method, path in (("POST", "/v1/store/gan/aliases/latest"), ("DELETE", "/v1/models/gan"),
                         ("PUT", "/v2/repository/models/gan/load"), ("POST", "/v2/repository/models/gan/unload")):
        status, body = http_json(method, f"{server['url']}{path}", {})
        assert status in (404, 405), (method, path, status, body)
