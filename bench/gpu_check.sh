#!/usr/bin/env bash
# `make gpu-check [OUT=dir]`: the GPU lane, for a machine with a GPU whose Python already has
# torch, triton and pytest and that may have no network. Builds cnnops for the local GPU with
# that Python (nothing is downloaded), runs `pytest -m cuda`, then the GPU benchmarks in NCHW
# and channels_last, which write bench/results/<gpu-name>[-channels-last].md|csv. With OUT set, logs and results are copied there too.
# Every stage runs even if an earlier check failed, so one failure does not hide the others;
# the exit status is 1 if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-}
LOGS=$(mktemp -d)
status=0

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND with a time limit, logging to LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%T), limit ${limit}s): $*"
    # SIGTERM at the limit: the benchmark then still writes the cases it finished (-partial).
    timeout --signal=TERM --kill-after=20 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    return "$rc"
}

"$PYTHON" -c 'import torch' || { echo "make gpu-check: $PYTHON has no torch (set PYTHON=...)"; exit 1; }
if "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    "$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")'
    arch=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
    have_gpu=1
else
    # Without a GPU the lane still builds (for sm_90, as CI does) and collects the GPU tests,
    # which are skipped with their reason; there is nothing to benchmark, and that is not a failure.
    echo "make gpu-check: no CUDA GPU found on this machine; building and collecting the GPU tests only"
    arch=9.0
    have_gpu=0
fi
stamp=$(mktemp)

TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} CNNOPS_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    stage build "${BUILD_LIMIT:-240}" "$PYTHON" -m pip install --disable-pip-version-check \
    --no-index --no-build-isolation --no-deps -e . || exit 1
# timm is a test dependency of the CPU model tests only (none is cuda-marked); a GPU machine's
# Python may not have it, and importing the file would then fail the whole collection.
ignore=()
"$PYTHON" -c "import timm" 2>/dev/null || ignore=(--ignore=tests/models/test_timm_models.py)
stage tests "${TESTS_LIMIT:-180}" "$PYTHON" -m pytest -m cuda tests -q -ra ${ignore[@]+"${ignore[@]}"} || status=1
if [ "$have_gpu" = 1 ]; then
    # Every provider on NCHW inputs (cuDNN's channels_last kernels as the torch-nhwc provider),
    # then every provider on channels_last inputs: the layout the implicit GEMM goal is set in.
    # The stage limits add up to 10 minutes: the lane's budget on one GPU. A benchmark cut at
    # its limit keeps the cases it finished (-partial results).
    bench_args=${BENCH_ARGS:---budget 0.2}
    # shellcheck disable=SC2086  # bench_args is a list of arguments
    stage bench "${BENCH_LIMIT:-90}" "$PYTHON" -m bench --device cuda $bench_args || status=1
    # shellcheck disable=SC2086
    stage bench-channels-last "${BENCH_LIMIT:-90}" "$PYTHON" -m bench --device cuda \
        --channels-last $bench_args || status=1
else
    echo "make gpu-check: no GPU, so no GPU benchmarks; the build and the test collection ran"
fi

if [ -n "$OUT" ]; then
    mkdir -p "$OUT"
    cp "$LOGS"/*.log "$OUT"/
    find bench/results -type f -newer "$stamp" -exec cp {} "$OUT"/ \;
fi
rm -rf "$LOGS" "$stamp"
exit "$status"
