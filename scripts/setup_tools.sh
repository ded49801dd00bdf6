#!/usr/bin/env bash
# Deploy-check tools that cannot share .venv: checkov pins older packaging, networkx, importlib_metadata and
# python-dateutil than genserve's dependencies (torch, ray) need, so it gets a venv of its own inside .venv/
# (git-ignored), .venv/checkov. tests/test_deploy_k8s.py finds it there (or at $GENSERVE_CHECKOV, or on
# PATH) and runs this script itself when it is missing. Idempotent.
# Usage: scripts/setup_tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
venv=.venv/checkov

if [[ -x "$venv/bin/checkov" ]] && [[ "$("$venv/bin/checkov" --version 2>/dev/null)" == "$CHECKOV_VERSION" ]]; then
  exit 0
fi
echo "==> installing checkov $CHECKOV_VERSION into $venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
"$venv/bin/checkov" --version
