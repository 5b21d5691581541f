#!/usr/bin/env bash
# GPU verification (issues 12 and 23), one command: the CUDA tests, then training and inference
# throughput with the issues' goals marked met/missed, in under 8 minutes on one H200.
#
#   bash tools/gpu_check.sh [--smoke] [--budget SECONDS] [--tests-only | --bench-only]
#
# Runs with the machine's own python3 (or $PYTHON), not a project venv: on the GPU machine that is
# the system Python with torch 2.11 + CUDA 13, torchvision and Triton. Installs nothing from the
# network: the package runs from this working tree (src/ on PYTHONPATH) and wheels placed in .whl/
# (carried to an offline machine) are unpacked into a private folder first. Optional packages
# (DALI, pycocotools, faster-coco-eval, onnx, onnxruntime) may be absent: the parts and tests that
# need them say "skipped" with the reason. Logs, the JUnit XML of the tests and gpu_check.json go to
# $OUT when it is set. The budget counts from the script's start. Without a CUDA GPU (or with
# --smoke) it says so in one line and runs only the CPU-safe parts (argument parsing, imports, a
# tiny CPU run of every benchmark code path), exiting 0 when they pass: that is what CI runs.
set -uo pipefail
start=$SECONDS

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1

budget=470 smoke=0 run_tests=1 run_bench=1
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke=1 ;;
        --budget) shift; budget="${1:-}" ;;
        --tests-only) run_bench=0 ;;
        --bench-only) run_tests=0 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$budget" in
    ''|*[!0-9]*) echo "gpu_check.sh: --budget needs a whole number of seconds, got '$budget'" >&2; exit 2 ;;
esac
if [ "$run_tests" = 0 ] && [ "$run_bench" = 0 ]; then
    echo "gpu_check.sh: --tests-only and --bench-only exclude each other" >&2; exit 2
fi

# The interpreter: $PYTHON, else python3 (the GPU machine's holds torch; a venv does not travel there).
PYTHON="${PYTHON:-python3}"
out="${OUT:-}"
if [ -n "$out" ]; then mkdir -p "$out" || exit 1; fi
log() { echo "gpu_check: $*"; }

# --- install from the working tree ------------------------------------------------------------
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d /tmp/ssd300-site.XXXXXX)"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
        log "installing the wheels in .whl/ failed"; exit 1
    fi
fi
export PYTHONPATH="$repo/src${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! import_error="$("$PYTHON" -c "import torch, torchvision, numpy, PIL, ssd300.training" 2>&1)"; then
    log "the package does not import with $PYTHON:"; echo "$import_error"; exit 1
fi
missing="$("$PYTHON" - <<'EOF'
import importlib.util
names = {"pycocotools": "pycocotools", "faster_coco_eval": "faster-coco-eval", "nvidia.dali": "nvidia-dali",
         "onnx": "onnx", "onnxruntime": "onnxruntime", "pytest": "pytest", "pytest_timeout": "pytest-timeout"}
def present(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
print(" ".join(package for module, package in names.items() if not present(module)))
EOF
)"

has_cuda=0
if [ "$smoke" = 0 ] && "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    has_cuda=1
fi

# The CUDA tests, as run on the GPU machine (without CUDA every one of them skips with its reason,
# which still checks that they import and collect with this Python and these packages).
run_cuda_tests() {  # $1: seconds at most
    local args=(-m cuda -q -rs -p no:cacheprovider tests/test_cuda.py)
    case " $missing " in *" pytest-timeout "*) ;; *) args+=(--timeout=150) ;; esac
    [ -n "$out" ] && args+=(--junitxml="$out/pytest_cuda.xml")
    timeout --kill-after=10 "$1" "$PYTHON" -m pytest "${args[@]}"
}

if [ "$has_cuda" = 0 ]; then
    if [ "$smoke" = 1 ]; then reason="--smoke"; else reason="no CUDA GPU here"; fi
    log "$reason: no GPU figures; collecting the CUDA tests (they skip) and running the CPU smoke of the code paths"
    [ -n "$missing" ] && log "not installed here (their tests/parts are skipped): $missing"
    rc=0
    case " $missing " in
        *" pytest "*) log "pytest is not installed here: the CUDA tests cannot be collected" ;;
        *) run_cuda_tests 120 || { rc=$?; log "the CUDA tests did not collect and skip cleanly (exit $rc)"; } ;;
    esac
    "$PYTHON" tools/gpu_check.py --smoke ${out:+--out "$out"} || rc=$?
    [ "$rc" = 0 ] && log "CPU smoke passed" || log "CPU smoke FAILED (exit $rc)"
    exit "$rc"
fi

# --- on a CUDA machine ------------------------------------------------------------------------
if [ -n "$out" ]; then exec > >(tee "$out/gpu_check.log") 2>&1; fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null \
    | sed 's/^/gpu_check: GPU: /'
"$PYTHON" -c "import torch, torchvision; print('gpu_check: torch', torch.__version__, 'CUDA', torch.version.cuda,
'torchvision', torchvision.__version__, 'GPU', torch.cuda.get_device_name(0))"
[ -n "$missing" ] && log "not installed here (their tests/parts are skipped): $missing"

tests_rc="not run" bench_rc="not run"
case " $missing " in *" pytest "*)
    log "pytest is not installed here: the CUDA tests cannot run (carry its wheel in .whl/)"
    run_tests=0 tests_rc="no pytest" ;;
esac
if [ "$run_tests" = 1 ]; then
    # The CUDA tests get at most 200 s (about 2 minutes expected); the benchmarks get the rest.
    tests_budget=$(( run_bench == 1 ? 200 : budget - 10 ))
    log "CUDA tests (at most ${tests_budget} s)"
    run_cuda_tests "$tests_budget"
    tests_rc=$?
    [ "$tests_rc" = 124 ] && log "the CUDA tests ran past ${tests_budget} s and were stopped"
fi
if [ "$run_bench" = 1 ]; then
    left=$(( budget - (SECONDS - start) ))
    if [ "$left" -lt 60 ]; then
        log "only ${left} s left of ${budget}: benchmarks skipped"
    else
        log "benchmarks (at most ${left} s)"
        timeout --kill-after=10 "$left" "$PYTHON" tools/gpu_check.py --budget-s $(( left - 30 )) ${out:+--out "$out"}
        bench_rc=$?
    fi
fi
log "done in $(( SECONDS - start )) s: CUDA tests exit ${tests_rc}, benchmarks exit ${bench_rc}"
[ "$tests_rc" = 0 ] || [ "$tests_rc" = "not run" ] || exit 1
[ "$bench_rc" = 0 ] || [ "$bench_rc" = "not run" ] || exit 1
exit 0
