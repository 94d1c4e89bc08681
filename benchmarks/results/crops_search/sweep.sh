#!/usr/bin/env bash
# The crops search (docs/recipes_crops.md): validation runs of --recipe fast, two at a time with one thread each
# (never beside other torch work), each run folder under benchmarks/results/crops_search/.
#   bash benchmarks/results/crops_search/sweep.sh NAME "TRAIN ARGS" NAME2 "TRAIN ARGS 2"
# A run with final.pt is skipped; one with last.pt only is resumed. The runs meant fast recipe version 3 by
# --recipe fast (fast128_45ep_* and fast96_42ep_*: version 5, shape and length given): replay one exactly with
# `python train.py --config <run>/config.json`.
# lr2.5e-3_*: version 6 with --lr 2.5e-3 (which became version 7); the runs before it used 5e-3.
# lr1.25e-3_*, wd0.2_*: version 7 with the one flag their names say; wd0.5_*: version 8 with it.
# dec1.5_*: version 9 with --train-decode-scale 1.5.
set -u
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/crops_search
run() {
  local name=$1; shift
  local args="--data ../shared/data/crops --recipe fast --val-split 0.1 --val-seed 0 --threads 1 --workers 1 $*"
  if [ -f "$OUT/$name/final.pt" ]; then echo "$name: done"; return 0; fi
  if [ -f "$OUT/$name/last.pt" ]; then
    OMP_NUM_THREADS=1 python train.py --resume "$OUT/$name" --threads 1 > "$OUT/$name.log" 2>&1
  else
    OMP_NUM_THREADS=1 python train.py $args --out "$OUT" --name "$name" > "$OUT/$name.log" 2>&1
  fi
  echo "$name: exit $? $(tail -1 "$OUT/$name.log")"
}
while [ $# -ge 2 ]; do
  run "$1" "$2" &
  if [ $# -ge 4 ]; then run "$3" "$4" & shift 2; fi
  shift 2
  wait
done
