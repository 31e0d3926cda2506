#!/usr/bin/env bash
# #29's no-slowdown check on the lent GPU: each scripts/gpu_bench.sh job run in this tree,
# then in the tree of 3959233 (the commit #29 was filed at, carried as .whl/old: git-ignored,
# `git archive 3959233 | tar -x -C .whl/old`), on the same machine in the same call. Results
# under $OUT/noslowdown/{new,old}/, packed into $OUT/noslowdown.tgz (the device tool brings
# back 8 files), and $OUT/noslowdown-gpu.{json,png} (benchmarks/noslowdown.py): each job's p50
# of the sync total in both trees, their ratio (new / old) and the phases that moved.
#
#   WS_NOSLOWDOWN_UNCHECKED=1 bash scripts/gpu_noslowdown.sh colocated-0.5b moe-30b-a3b-4l
set -uo pipefail
cd "$(dirname "$0")/.."
base=$(realpath -m "${OUT:-runs/gpu-bench}")
res=$base/noslowdown
old=${WS_OLD_TREE:-.whl/old}
mkdir -p "$res/new" "$res/old" "$res/unchecked"
for job in "$@"; do
  OUT=$res/new bash scripts/gpu_bench.sh "$job"
  OUT=$res/old bash "$old/scripts/gpu_bench.sh" "$job"
  # WS_NOSLOWDOWN_UNCHECKED=1: this tree again with the finite check off (3959233 had none),
  # to tell what the check costs from what the rest of the tree does
  [ "${WS_NOSLOWDOWN_UNCHECKED:-0}" = 1 ] && \
    OUT=$res/unchecked WS_BENCH_ARGS=--no-check-finite bash scripts/gpu_bench.sh "$job"
done
python3 -m benchmarks.noslowdown "$res" "$base/noslowdown-gpu.json" "$@"
tar czf "$base/noslowdown.tgz" -C "$res" . && rm -rf "$res"
