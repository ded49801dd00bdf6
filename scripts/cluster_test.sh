#!/usr/bin/env bash
# The multi-host cluster tests (tests/cluster/, marker `cluster`): a Ray head, two workers and Redis, each in
# its own network namespace on this machine, genserve deployed with `serve deploy`, then load, faults and
# autoscaling. Needs root, iproute2 and redis-server, and the venv from scripts/setup.sh --test.
#   bash scripts/cluster_test.sh [--rev REV] [PYTEST ARGS...]     e.g. -k node_killed
# --rev REV: run the cluster on a `git archive REV` copy of the code instead of the working tree (to test a
# commit while the tree is being edited, or to compare two); results then say which.
# Bounded: the whole run is killed after CLUSTER_TEST_TIMEOUT seconds (default 900), and what it started is
# removed (the tests' fixtures; then this script sweeps gsc-* namespaces, whatever happened).
# Figures go to benchmarks/results/cluster.json.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "cluster tests: need root (network namespaces); try: sudo $0" >&2
  exit 2
fi
command -v redis-server >/dev/null || { echo "cluster tests: apt-get install -y redis-server" >&2; exit 2; }
.venv/bin/python -c "import ray" 2>/dev/null || { echo "cluster tests: run scripts/setup.sh --test first" >&2; exit 2; }

if [[ "${1:-}" == "--rev" ]]; then
  rev=$(git rev-parse --short "$2") || exit 2
  src=${GENSERVE_CLUSTER_DIR:-/tmp/genserve-cluster}-src-$rev
  rm -rf "$src" && mkdir -p "$src" && git archive "$rev" | tar -x -C "$src" || exit 2
  export GENSERVE_CLUSTER_SRC=$src GENSERVE_CLUSTER_SRC_REV=$rev
  shift 2
fi

sweep() {
  # whatever a killed run left: every gsc-* namespace (SIGKILL its processes first) and the bridge
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^gsc-'); do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  ip link del gscbr0 2>/dev/null
  true
}
trap "sweep; sweep" EXIT

timeout --kill-after=30 "${CLUSTER_TEST_TIMEOUT:-900}" \
  .venv/bin/python -m pytest -m cluster tests/cluster -q -p no:cacheprovider -s "$@"
status=$?
[[ $status -eq 124 || $status -eq 137 ]] && echo "cluster tests: killed after ${CLUSTER_TEST_TIMEOUT:-900} s" >&2
exit $status
