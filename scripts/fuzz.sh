#!/usr/bin/env bash
# The long fuzzing run: tests/test_fuzz.py (schemathesis against /openapi.json, mutated gRPC ModelInfer bytes,
# malformed HTTP request lines and headers) and tests/test_edge_limits.py against one app, with every fuzzing
# budget GENSERVE_FUZZ_SCALE times the default suite's (default 25: ~200 cases per operation and mode,
# ~3750 gRPC and ~3000 HTTP mutations; about 15 minutes on 2 cores). Traffic stays on 127.0.0.1.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export GENSERVE_FUZZ_SCALE="${GENSERVE_FUZZ_SCALE:-25}"
exec .venv/bin/python -m pytest -q -s tests/test_fuzz.py tests/test_edge_limits.py "$@"
