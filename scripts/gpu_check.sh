#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py plus the @pytest.mark.gpu tests), for the GPU machine the device tool lends.
#
# That machine runs the working tree under its own python3 (3.12, torch with CUDA 13, onnx, CPU-only
# onnxruntime, pytest) and reaches no registry, so onnxruntime-gpu has to travel with the calls. Its wheel
# (~244 MiB) is bigger than one call may carry (64 MiB with the ~20 MiB tree), so it travels in parts:
#
#   here:    bash scripts/gpu_check.sh stage          download onnxruntime-gpu for python 3.12, split it into
#                                                     .gpu_wheels/pNN/ (git-excluded), print the calls to make
#   device:  bash scripts/gpu_check.sh receive        one call per part, carry [".gpu_wheels/pNN"], back to back:
#                                                     the machine keeps /tmp only while warm (30 s after a call)
#   device:  bash scripts/gpu_check.sh                carry ["model_store_data"]: reassemble and install the
#                                                     wheel, then run the check; results in $OUT
#
# Without the parts the check still runs, on whatever providers the machine has (CPU only: the fallback,
# labelled as such). TensorRT cannot travel (tensorrt-cu13-libs is gigabytes): its rows say "not run".
# $OUT gets gpu.md, gpu.json (commit them as benchmarks/results/gpu.*), gpu_check.log, pytest_gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."

ORT_GPU=onnxruntime-gpu==1.31.1   # a CUDA 13 build (its [cuda] extra wants nvidia-*-cu13), as the machine's torch
WHEELS=.gpu_wheels                # here: the parts; there: what a call carried
PARTS=/tmp/genserve-wheel-parts   # there: the parts received so far (kept while the machine stays warm)
SITE=/tmp/genserve-site

stage() {
  local py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  rm -rf "$WHEELS" && mkdir -p "$WHEELS/dl"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$WHEELS/dl" "$ORT_GPU" || exit 1
  local whl; whl=$(ls "$WHEELS"/dl/*.whl)
  # room in one call: 64 MiB less what the working tree takes, less 2 MiB to spare
  local tree_mib=$(( $(git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -1 | cut -f1) / 1048576 + 1 ))
  local part_mib=$(( 62 - tree_mib ))
  (cd "$WHEELS" && split -b "${part_mib}M" -d -a 2 "dl/$(basename "$whl")" part.)
  local count; count=$(ls "$WHEELS"/part.* | wc -l)
  local sum; sum=$(sha256sum "$whl" | cut -d' ' -f1)
  for part in "$WHEELS"/part.*; do
    local n=${part##*.}
    mkdir -p "$WHEELS/p$n" && mv "$part" "$WHEELS/p$n/" && echo "$(basename "$whl") $sum $count" > "$WHEELS/p$n/WHEEL"
  done
  rm -rf "$WHEELS/dl"
  echo "staged $(basename "$whl") in $count parts of ${part_mib} MiB (the tree takes ${tree_mib} MiB). Device calls, back to back:"
  for d in "$WHEELS"/p*; do echo "  run: bash scripts/gpu_check.sh receive    carry: [\"$d\"]"; done
  echo "  run: bash scripts/gpu_check.sh            carry: [\"model_store_data\"]   timeout_s: 600"
}

receive() {  # copy whatever parts this call carried into /tmp, and say what is there
  mkdir -p "$PARTS"
  for d in "$WHEELS"/p*/; do [ -d "$d" ] && cp "$d"/part.* "$d"/WHEEL "$PARTS"/; done
  echo "parts received: $(ls "$PARTS"/part.* 2>/dev/null | wc -l) of $(cut -d' ' -f3 "$PARTS/WHEEL" 2>/dev/null || echo '?')"
  if [ -d model_store_data ]; then rm -rf /tmp/genserve-store && cp -r model_store_data /tmp/genserve-store; fi
}

install_wheel() {  # reassemble the parts, check the hash, install onnxruntime-gpu ahead of the image's onnxruntime
  [ -f "$PARTS/WHEEL" ] || { echo "no onnxruntime-gpu parts received: the machine's own onnxruntime runs"; return; }
  read -r name sum count < "$PARTS/WHEEL"
  local have; have=$(ls "$PARTS"/part.* | wc -l)
  [ "$have" -eq "$count" ] || { echo "only $have of $count onnxruntime-gpu parts: not installed"; return; }
  cat "$PARTS"/part.* > "/tmp/$name"
  echo "$sum  /tmp/$name" | sha256sum -c --quiet || { echo "onnxruntime-gpu wheel hash mismatch: not installed"; return; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "/tmp/$name" \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" && echo "installed $name into $SITE"
}

check() {
  receive
  install_wheel
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  # the CUDA 13 libraries onnxruntime-gpu's CUDA EP needs are the nvidia-* wheels beside the image's torch
  local libs; libs=$(python3 -c "import glob, os, torch; print(':'.join(glob.glob(os.path.join(
    os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', '**', 'lib'), recursive=True)))" 2>/dev/null)
  [ -n "$libs" ] && export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: none"
  python3 -c "import sys, torch, onnxruntime as o; print(sys.version.split()[0], 'torch', torch.__version__,
    'cuda', torch.cuda.is_available(), '| onnxruntime', o.__version__, o.get_available_providers())"
  local store=model_store_data
  if [ ! -d "$store" ] && [ -d /tmp/genserve-store ]; then store=/tmp/genserve-store; fi
  if [ ! -d "$store" ]; then  # genserve is not installed there (no CLI): build through the module
    echo "no store carried: building one"
    timeout 180 python3 -c "from genserve.build import build; from model_store import ModelStore; build(ModelStore.open('$store'))"
  fi
  # GPU_CHECK_ARGS: extra arguments, e.g. "--quick" when device time is short
  timeout 300 python3 -m benchmarks.gpu --store "$store" --out "$out" ${GPU_CHECK_ARGS:-}; local rc=$?
  echo "benchmarks.gpu exit $rc"
  GENSERVE_STORE="$store" timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_exporters.py tests/test_gpu_bench.py > "$out/pytest_gpu.log" 2>&1
  echo "gpu tests exit $? (pytest_gpu.log):"; tail -5 "$out/pytest_gpu.log"
  return $rc
}

case "${1:-check}" in
  stage) stage ;;
  receive) receive ;;
  check) out=${OUT:-build/gpu_check}; mkdir -p "$out"; check 2>&1 | tee "$out/gpu_check.log" ;;
  *) echo "usage: bash scripts/gpu_check.sh [stage|receive|check]" >&2; exit 2 ;;
esac
