"""Checkpoints -> graphs serving can run: contracts (contracts.py), ONNX export and parity (onnx_export.py),
TensorRT engines (tensorrt.py), runtime provider choice (runtime.py). Import submodules directly:
contracts and runtime stay free of torch so serving can use them."""
