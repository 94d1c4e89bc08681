#!/usr/bin/env bash
# One GPU check, about 4 minutes on an H100 (step limits add up to 8 minutes): build ghost_ext with its
# CUDA kernels, run the op's tests (CUDA and CPU), benchmark and profile the op on CUDA (with A/B runs of
# the other kernel variants) and run a short training-throughput benchmark.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; needs nvcc, a CUDA torch, a GPU; no network
#
# Writes into $OUT when set, else benchmarks/results/: gpu_check.log (everything), pytest_cuda.log,
# bench_op_cuda.json/.md, profile_op_cuda.json/.md (per-kernel times), unfused_kernels/bench_op_cuda.*
# (GHOST_CUDA_FUSED_MAX_TILES=0: tiled, with separate merging launches) and generic_kernels/bench_op_cuda.*
# (GHOST_CUDA_TILES=0: the kernels before the tiled ones), bench_train_cuda.json/.md; prints a short
# table last.
# A failing step is reported and the later steps still run; the exit status is 1 if any step failed.
set -u -o pipefail

cd "$(dirname "$0")/.."
RES="${OUT:-benchmarks/results}"
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # the H100 only: halves nvcc's time
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export GHOST_EXT_CUDA=1                                     # fail the build rather than skip CUDA

NAMES=() STATES=() TIMES=()
FAILED=0

# run_step NAME SECONDS LOGFILE CMD...: runs CMD under a time limit, output to the screen, to
# gpu_check.log and (when LOGFILE is not "-") to LOGFILE; records ok / FAIL(rc) / TIMEOUT.
run_step() {
    local name=$1 limit=$2 extra=$3
    shift 3
    local t0=$SECONDS rc
    echo "=== [$(date -u +%H:%M:%S)] $name (limit ${limit}s): $*" | tee -a "$LOG"
    if [ "$extra" = "-" ]; then
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
        rc=$?
    else
        timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$extra" | tee -a "$LOG"
        rc=$?
    fi
    local state="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then state="TIMEOUT"; FAILED=1
    elif [ $rc -ne 0 ]; then state="FAIL($rc)"; FAILED=1; fi
    NAMES+=("$name") STATES+=("$state") TIMES+=("$((SECONDS - t0))")
    echo "=== $name: $state in $((SECONDS - t0)) s" | tee -a "$LOG"
}

run_step "environment" 20 - bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; \
    nvcc --version | tail -n 2; $PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; \
    nproc; git log --oneline -1 2>/dev/null || true"

# Fresh build (build/ and the .so are ignored files, so a copied tree has none anyway).
rm -rf build ghost_ext/_C.*.so
run_step "build (setup.py build_ext --inplace, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)" 120 - \
    "$PY" setup.py build_ext --inplace
run_step "import check, auto's choice at one shape" 20 - "$PY" -c "import ghost_ext, torch; \
assert ghost_ext.has_kernel('cuda'), 'no CUDA kernels in the build'; d = 'cuda'; \
x, w = torch.randn(64, 80, 29, 29, device=d), torch.randn(80, 1, 3, 3, device=d); \
g, b, rm, rv = torch.ones(80, device=d), torch.zeros(80, device=d), torch.zeros(80, device=d), torch.ones(80, device=d); \
ghost_ext.ghost_concat(x, w, g, b, rm, rv, True, 0.1, 1e-5, True, 160, impl='auto'); \
print('auto on', torch.cuda.get_device_name(), ghost_ext._chooser.decisions, 'ext/torch s:', ghost_ext._chooser.timings)"

# CUDA tests first (the point of this script), then the rest of the op's tests on this machine's CPU.
# The slow CPU-only tests (torch.compile, export) are CI's job; here only what needs the GPU.
run_step "pytest tests/test_op.py, test_autotune.py + CUDA augmentation test" 75 "$RES/pytest_cuda.log" \
    "$PY" -m pytest tests/test_op.py tests/test_autotune.py tests/test_augment.py::test_cuda_pipeline_matches_cpu -q -p no:cacheprovider \
    --durations=5 -m "cuda or not slow"

run_step "bench_op.py --device cuda" 80 - \
    "$PY" benchmarks/bench_op.py --device cuda --repeat 20 --out "$RES" --note "gpu_check.sh"

# Where the op's time goes: per-kernel device time and launch gaps at batch 64, float32, fwd+bwd.
run_step "profile_op.py --device cuda (per-kernel times)" 40 - \
    "$PY" benchmarks/profile_op.py --device cuda --batch 64 --dtype float32 --mode train_fwd_bwd --out "$RES"

# The tiled kernels with the separate merging launches (no in-kernel merges), for the A/B.
run_step "bench_op.py --device cuda, tiled unfused (GHOST_CUDA_FUSED_MAX_TILES=0)" 35 - \
    env GHOST_CUDA_FUSED_MAX_TILES=0 "$PY" benchmarks/bench_op.py --device cuda --batch 64 --dtype float32 --repeat 20 \
    --out "$RES/unfused_kernels" --note "gpu_check.sh, GHOST_CUDA_FUSED_MAX_TILES=0"

# The same benchmark with the tiled NCHW kernels off (the generic per-pixel kernels), for the A/B.
run_step "bench_op.py --device cuda, generic kernels (GHOST_CUDA_TILES=0)" 40 - \
    env GHOST_CUDA_TILES=0 "$PY" benchmarks/bench_op.py --device cuda --batch 64 --dtype float32 --repeat 20 \
    --out "$RES/generic_kernels" --note "gpu_check.sh, GHOST_CUDA_TILES=0"

if [ -f benchmarks/bench_train.py ]; then
    run_step "bench_train.py --device cuda (short, bf16 autocast)" 50 - \
        "$PY" benchmarks/bench_train.py --device cuda --batch-size 64 --steps 10 --warmup 3 --amp \
        --out-dir "$RES" --note "gpu_check.sh short run"
else
    echo "=== bench_train.py not found; skipped" | tee -a "$LOG"
fi

{
    echo
    echo "==================== gpu_check summary ===================="
    for i in "${!NAMES[@]}"; do
        printf '%-62s %-10s %5s s\n' "${NAMES[$i]}" "${STATES[$i]}" "${TIMES[$i]}"
    done
    echo "--- pytest:"
    grep -E "^(FAILED|ERROR)" "$RES/pytest_cuda.log" 2>/dev/null | head -n 15
    tail -n 1 "$RES/pytest_cuda.log" 2>/dev/null
    for J in "$RES/bench_op_cuda.json" "$RES/unfused_kernels/bench_op_cuda.json" "$RES/generic_kernels/bench_op_cuda.json"; do
    if [ -f "$J" ]; then
        echo "--- bench_op $J (sum over the 32 GhostNet shapes; speedup = torch / ext; GPU = CUDA-graph replay time, eager = Python loop):"
        "$PY" - "$J" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['machine'].get('gpu', '?')}, copy {r['copy_bandwidth_GBps']:.0f} GB/s")
for run in r["runs"]:
    for m, t in run["totals"].items():
        line = (f"  batch {run['batch']:>4} {run['dtype']:>9} {m:<14} GPU ext {t['ext_ms']:7.2f} torch {t['torch_ms']:7.2f} ms"
                f" {t['speedup']:5.2f}x floor {t['floor_ms']:6.2f}")
        if "ext_eager_ms" in t:
            line += f" | eager ext {t['ext_eager_ms']:7.2f} torch {t['torch_eager_ms']:7.2f} ms {t['eager_speedup']:5.2f}x"
        print(line)
for n in r.get("notes", [])[:8]:
    print("  note:", n)
EOF
    fi
    done
    if [ -f "$RES/profile_op_cuda.json" ]; then
        echo "--- profile_op (batch 64 float32 fwd+bwd, sum of 32 shapes; busy = kernel time, wall - busy = gaps):"
        "$PY" - "$RES/profile_op_cuda.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for impl in ("ext", "torch"):
    s = r["summary"][impl]
    print(f"  {impl:>5}: wall {s['wall_us'] / 1e3:6.2f} ms, busy {s['busy_us'] / 1e3:6.2f} ms, {s['launches']:.0f} launches")
    for name, k in list(r["totals"][impl].items())[:5]:
        print(f"         {k['us'] / 1e3:6.2f} ms  {k['count']:5.0f}x  {name}")
EOF
    fi
    if [ -f "$RES/bench_train_cuda.md" ]; then
        echo "--- bench_train:"
        grep -E "^\|" "$RES/bench_train_cuda.md" | head -n 8
    fi
    echo "total $SECONDS s; results in $RES"
} 2>&1 | tee -a "$LOG"
exit $FAILED
