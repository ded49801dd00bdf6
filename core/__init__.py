"""The bottom of genserve: facts and pure maths that training, export, the model store, serving and the
load generator all share — graph contracts and constants, the noise schedule and sampler step functions,
guidance, the ONNX Runtime session wrapper, typed sampling settings and quality metrics, and the
KServe v2 protocol stubs.

Depends on numpy, torch (samplers only), onnxruntime (runtime only), protobuf/grpc (protos only) and the
standard library; it imports nothing else of the project, and everything else points down to it
(tests/test_layout.py holds that)."""
