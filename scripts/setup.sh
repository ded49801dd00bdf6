#!/usr/bin/env bash
# Set up genserve on a fresh Debian machine with only Python 3.11: a virtualenv in .venv with the
# CPU build of torch (pinned and installed first: an unpinned torch pulls a multi-GB CUDA build),
# then the project, then Debian's Fashion-MNIST package when the data is needed and absent.
# Usage: scripts/setup.sh [--test]   (--test also installs the test-only dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

if [[ ! -x .venv/bin/python ]]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "==> installing torch 2.13.0 (CPU build)"
  .venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
fi
echo "==> installing genserve${extras}"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".${extras}"

data_dir=${GENSERVE_DATA_DIR:-/usr/share/datasets/fashion-mnist}
if [[ ! -e "$data_dir/t10k-images-idx3-ubyte.gz" && ! -e "$data_dir/t10k-images-idx3-ubyte" ]]; then
  echo "==> installing Debian's dataset-fashion-mnist"
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq dataset-fashion-mnist
fi
if [[ -n "$extras" && ! -x /usr/bin/chromium ]]; then
  # Browser tests drive Debian's chromium through playwright (its own browser download needs the network).
  echo "==> installing Debian's chromium"
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo" || sudo_cmd=""
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq chromium
fi
if [[ -n "$extras" ]] && ! { command -v prometheus && command -v promtool; } >/dev/null; then
  # The metrics tests scrape the app with a real Prometheus and check the alert rules with promtool.
  echo "==> installing Debian's prometheus"
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo" || sudo_cmd=""
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends prometheus
fi
if [[ -n "$extras" ]] && ! command -v redis-server >/dev/null; then
  # The cluster tests run Ray's GCS fault tolerance against a real Redis (tests/cluster/).
  echo "==> installing Debian's redis-server"
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo" || sudo_cmd=""
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends redis-server
fi
# checkov (the manifests' policy check) pins versions that would downgrade torch's and Ray's deps: its own venv
[[ -n "$extras" ]] && bash scripts/setup_tools.sh
echo "==> ready: $(.venv/bin/genserve --version)"
