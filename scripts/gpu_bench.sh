#!/usr/bin/env bash
# GPU benchmarks on the lent machine, one command (after the wheels are installed, see
# scripts/gpu_run.sh --install). Results (JSON + PNG + log) go to $OUT or runs/gpu-bench.
#
#   bash scripts/gpu_bench.sh 0.5b-native 1.5b 7b colocated-0.5b kernels moe-30b-a3b
#
# 0.5b-native: 0.5B-shaped sync benchmark plus vLLM's native IPC API on the same weights;
# <shape>: that shape's sync benchmark; colocated-<shape>[@<gpu share>]: the colocated loop (the
# engine sleeps at level 2 before every sync, the sync goes into it; vLLM's memory share 0.4
# unless given); kernels: the building blocks vs the copy floor; digest: the checksum
# kernels (and the copy that checksums as it reads) vs the read and copy floors; moe-<shape>: a Qwen3-MoE
# (benchmarks/run.py MOE_SHAPES) synced from transformers' in-memory module (fused experts)
# into one serving engine (no sleep, not colocated), 30 syncs, vLLM's memory share 0.4, the
# engine copying from the trainer's own tensors (--ipc-direct); moe-<shape>-packed: the same,
# packed (the trainer copies into IPC buckets first); adapters-<shape>: a rank-16 LoRA adapter
# synced in the engine calls and over the group vs the full sync over IPC (benchmarks/adapters.py);
# fp8-<shape>: a bf16 and an online-FP8 engine of the shape, sync time and rollout throughput
# (benchmarks/fp8_gpu.py); graphs: the colocated sync and rollout throughput of an eager and a
# CUDA-graph engine side by side (benchmarks/graphs_gpu.py).
# The device tool brings back at most 8 files from $OUT: each job writes a JSON and a PNG and
# all share bench.log, so a call with the GPU suite too (3 files) has room for 2 jobs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-bench}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_USE_V2_MODEL_RUNNER=1
common=(--ipc --ipc-reuse --sleep-level 1 --bucket-mib 2048 --engines 1 --workdir /tmp/bench)
# WS_BENCH_ARGS: extra arguments for every benchmarks.run job (e.g. --no-check-finite)
read -r -a run_args <<<"${WS_BENCH_ARGS:-}"
# A job whose engines failed to start says only "see root cause above": the cause is in the
# engines' own logs (vLLM in Ray actors, not this console). Keep their error lines in bench.log.
engine_errors() {
  { echo "== $1: error lines of the engines' Ray logs (latest session) =="
    grep -hE "Error|error:|CUDA out of memory|Traceback|ValueError|RuntimeError" \
      /tmp/ray/session_latest/logs/worker-*.err /tmp/ray/session_latest/logs/worker-*.out \
      2>/dev/null | grep -v FutureWarning | tail -n 60
  } >>"$out/bench.log"
}
rc=0
for job in "$@"; do
  case $job in
    adapters-*) s=${job#adapters-}  # LoRA rank 16: adapter sync vs full sync over IPC (#31)
      python3 -m benchmarks.adapters --shape "$s" --device cuda --engines 1 --ipc --syncs 10 \
        --workdir /tmp/bench --out "$out/adapters-gpu-$s.json" ;;
    fp8-*) s=${job#fp8-}  # bf16 vs online-FP8 engines: sync time and rollout tokens/s (#32)
      # (7b: 15.2 GB of bf16 weights per engine, and the trainer's beside them: 0.35 of an
      # 80 GB card each leaves the trainer ~24 GB; 0.25 left the engines ~5 GB for the rest)
      python3 -m benchmarks.fp8_gpu --shape "$s" --syncs 10 --workdir /tmp/bench \
        --gpu-util "$([ "$s" = 7b ] && echo 0.35 || echo 0.25)" --out "$out/fp8-gpu-$s.json" ;;
    graphs) python3 -m benchmarks.graphs_gpu --out "$out/graphs-gpu.json" ;;  # eager vs graphs
    kernels) python3 -m benchmarks.kernels --shape 0.5b --rounds 20 --out "$out/kernels-0.5b.json" ;;
    digest) python3 -m benchmarks.digest --gib 2 --out "$out/digest-gpu.json" ;;
    colocated-*) s=${job#colocated-}; util=0.4; [[ $s == *@* ]] && util=${s#*@} s=${s%@*}
      python3 -m benchmarks.run "${run_args[@]}" --shape "$s" --syncs 10 --colocated --ipc --ipc-reuse \
        --sleep-level 2 --bucket-mib 2048 --engines 1 --workdir /tmp/bench --gpu-util "$util" \
        --out "$out/colocated-gpu-$s-util$util.json" ;;
    moe-*-packed) s=${job%-packed}
      python3 -m benchmarks.run "${run_args[@]}" --shape "$s" --syncs 10 --ipc --ipc-reuse --sleep-level 0 \
        --bucket-mib 2048 --engines 1 --gpu-util 0.4 --workdir /tmp/bench \
        --out "$out/sync-gpu-$s-packed.json" ;;
    moe-*) python3 -m benchmarks.run "${run_args[@]}" --shape "$job" --syncs 30 --ipc --ipc-reuse --ipc-direct \
        --sleep-level 0 --bucket-mib 2048 --engines 1 --gpu-util 0.4 --workdir /tmp/bench \
        --out "$out/sync-gpu-$job.json" ;;
    *-native) s=${job%-native}
      python3 -m benchmarks.run "${run_args[@]}" --shape "$s" --syncs 10 --native "${common[@]}" \
        --out "$out/sync-gpu-$s.json" ;;
    *) python3 -m benchmarks.run "${run_args[@]}" --shape "$job" --syncs 5 "${common[@]}" --out "$out/sync-gpu-$job.json" ;;
  esac >>"$out/bench.log" 2>&1 || { rc=$?; echo "$job failed ($rc)"; engine_errors "$job"; }
  tail -n 3 "$out/bench.log"
done
exit $rc
