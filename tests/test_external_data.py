"""A graph that reads tensors from other files is refused before ONNX Runtime opens it: genserve serves graphs
from the bytes the store verified, and a location like ../../x would read outside the version folder."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.runtime import check_self_contained, make_session
from genserve.build import publish_checkpoint
from model_store import IntegrityError, ModelStore
from serving.runtime import load_model
from tests.helpers import small_checkpoint


def graph_bytes(location: str | None) -> bytes:
    """y = x + w, with w stored inline, or said to live in `location`."""
    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        w.external_data.add(key="location", value=location)
        w.external_data.add(key="length", value="16")
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_self_contained_graphs_open():
    check_self_contained(graph_bytes(None))
    assert make_session(graph_bytes(None)).run(None, {"x": np.zeros(4, np.float32)})[0].tolist() == [1.0] * 4


@pytest.mark.parametrize("location, outside", [("../../../etc/passwd", True), ("/etc/passwd", True),
                                               ("weights.bin", False)])
def test_external_data_is_refused_naming_the_file(location, outside):
    with pytest.raises(ValueError, match="external file") as err:
        make_session(graph_bytes(location))
    assert location in str(err.value) and ("outside its version folder" in str(err.value)) == outside


def test_a_store_version_with_an_escaping_graph_is_refused_at_load(tmp_path):
    store = ModelStore.open(tmp_path / "store")
    publish_checkpoint(store, small_checkpoint(tmp_path / "ck", "gan"), max_batch=2, threads=1, log=lambda _: None)
    model, version = store.resolve("gan")
    # A publisher that swaps in a graph reading ../../x: its manifest hashes match (they are the publisher's),
    # so the store's verification passes; the runtime refuses it.
    folder = tmp_path / "store" / model / version
    evil = graph_bytes("../../../../etc/passwd")
    (folder / "generate.onnx").write_bytes(evil)
    manifest = store.manifest(f"gan@{version}")
    manifest.files["generate.onnx"].sha256 = hashlib.sha256(evil).hexdigest()
    manifest.files["generate.onnx"].size = len(evil)
    (folder / "manifest.json").write_bytes(manifest.to_json())
    with pytest.raises(IntegrityError, match=r"outside its version folder.*refusing to load"):
        load_model(store.uri, "gan", {"gan": "generate"})
