#!/usr/bin/env bash
# The study's recipe against --recipe fast at 227 px on a GPU, the same number of epochs for both: the
# recipes campaign of benchmarks/experiments.py (all of cars_train, fixed length, final model scored on
# cars_test), one seed per recipe, the two runs side by side on the one GPU (--jobs 2) so that they share
# the machine's load. Sized for a short GPU loan: at 227 px and batch 64 a GhostNet step is bound by the
# host's kernel launches (bench_train_cuda.md: 45-49 ms a step on an H100), so two runs can share one GPU.
#
#   bash benchmarks/gpu_recipes.sh                                  # 40 epochs at 227 px on cuda
#   GHOSTCARS_DATA=.gpudata EPOCHS=30 bash benchmarks/gpu_recipes.sh
#   DEVICE=cpu EPOCHS=1 IMG=64 TRAIN_ARGS="--limit-train 128" bash benchmarks/gpu_recipes.sh   # smoke test
#
# Writes <RESULTS_DIR, else OUT, else benchmarks/results>/recipes_<IMG>px_<EPOCHS>ep_gpu/ (run folders,
# results.md/json) and, when OUT is set, OUT/recipes_gpu.tar.gz of it without checkpoints (a device machine
# returns a few files only: there give RESULTS_DIR outside OUT).
set -u -o pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EPOCHS="${EPOCHS:-40}"
IMG="${IMG:-227}"
DEVICE="${DEVICE:-cuda}"
DATA="${GHOSTCARS_DATA:-../shared/data}"
LIMIT="${LIMIT:-480}"  # seconds for the whole campaign; a run cut short keeps its metrics.csv and last.pt
RES="${RESULTS_DIR:-${OUT:-benchmarks/results}}/recipes_${IMG}px_${EPOCHS}ep_gpu${SEED:+_seed$SEED}"
export PYTHONUNBUFFERED=1
export GHOSTCARS_CACHE="${GHOSTCARS_CACHE:-/tmp/ghostcars_cache}"  # decoded images: never inside the results

mkdir -p "$RES"
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null \
        || echo "no nvidia-smi"
    "$PY" -c "import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
    nproc; uptime; git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$RES/environment.txt"

# --workers 4: each run decodes its splits once (then the cache serves them); two runs share the cores
timeout --kill-after=15 "$LIMIT" "$PY" benchmarks/experiments.py --campaign recipes --epochs "$EPOCHS" \
    --img-size "$IMG" --seed "${SEED:-0}" --seeds 1 --jobs 2 --device "$DEVICE" --data "$DATA" --out "$RES" --eval-runs 5 \
    --train-args "--workers 4 ${TRAIN_ARGS:-}" 2>&1 | tee "$RES/campaign.log"
rc=$?
echo "campaign exit status $rc" | tee -a "$RES/campaign.log"
if [ -n "${OUT:-}" ]; then
    tar --exclude='*.pt' -czf "$OUT/recipes_gpu.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"
fi
exit $rc
