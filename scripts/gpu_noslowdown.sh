#!/usr/bin/env bash
# #29's no-slowdown check on the lent GPU: each scripts/gpu_bench.sh job run in this tree,
# then in the tree of 3959233 (the commit #29 was filed at, carried as .whl/old: git-ignored,
# `git archive 3959233 | tar -x -C .whl/old`), on the same machine in the same call. Results
# under $OUT/noslowdown/{new,old}/, packed into $OUT/noslowdown.tgz (the device tool brings
# back 8 files), and $OUT/noslowdown.json: each job's p50 of the sync total in both trees and
# their ratio (new / old).
#
#   bash scripts/gpu_noslowdown.sh colocated-0.5b moe-30b-a3b-4l
set -uo pipefail
cd "$(dirname "$0")/.."
base=$(realpath -m "${OUT:-runs/gpu-bench}")
res=$base/noslowdown
old=${WS_OLD_TREE:-.whl/old}
mkdir -p "$res/new" "$res/old"
for job in "$@"; do
  OUT=$res/new bash scripts/gpu_bench.sh "$job"
  OUT=$res/old bash "$old/scripts/gpu_bench.sh" "$job"
done
python3 - "$res" "$base/noslowdown.json" "$@" <<'PY'
import glob, json, sys
res, out, jobs = sys.argv[1], sys.argv[2], sys.argv[3:]
summary = {}
for tree in ("new", "old"):
    for path in sorted(glob.glob(f"{res}/{tree}/*.json")):
        d = json.load(open(path))
        name = path.rsplit("/", 1)[1]
        summary.setdefault(name, {})[tree] = {
            "total_p50_s": d["runs"][0]["total"]["p50"], "total_p95_s": d["runs"][0]["total"]["p95"],
            "n": d["runs"][0]["total"]["n"], "meta": d.get("meta")}
for name, s in summary.items():
    if "new" in s and "old" in s:
        s["ratio_new_over_old_p50"] = s["new"]["total_p50_s"] / s["old"]["total_p50_s"]
json.dump({"jobs": jobs, "old_tree": "3959233", "results": summary}, open(out, "w"), indent=1)
print(json.dumps({k: v.get("ratio_new_over_old_p50") for k, v in summary.items()}))
PY
tar czf "$base/noslowdown.tgz" -C "$res" . && rm -rf "$res"
