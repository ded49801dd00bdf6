#!/usr/bin/env bash
# Set up (see setup.sh) and start genserve on the embedded default: local store, shipped weights.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/genserve up "$@"
