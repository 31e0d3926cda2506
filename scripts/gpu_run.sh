#!/usr/bin/env bash
# Run the GPU suite (tests/gpu, `-m gpu`) on the lent GPU machine, in one command.
#
#   bash scripts/gpu_run.sh [--install] [pytest args...]
#
# --install first installs the wheels staged in /tmp/wheelstage (vLLM 0.24.0 + Ray, see
# ../shared/gpu/README.md: carry .whl/c01..c08 with `install.sh add`, then this). Logs and
# results go to $OUT (the device tool's folder) or runs/gpu: pytest.log, gpu-results.json
# (device, versions, per-test outcome, per-phase timings, memory per cycle, parity), and
# the engines' Ray logs. WS_GPU_FILES="tests/gpu/a.py tests/gpu/b.py" runs only those files,
# in that order, instead of the whole suite. WS_GPU_STREAMS=N runs the tests that do not
# measure the device N at a time (tests/gpu/streams.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
if [ "${1:-}" = "--install" ]; then
  shift
  bash /tmp/wheelstage/install.sh install 2>&1 | tail -n 5 || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export VLLM_WORKER_MULTIPROC_METHOD=spawn  # fork hangs after "Using V2 Model Runner"
export VLLM_USE_FLASHINFER_SAMPLER=0       # flashinfer is not staged
export VLLM_USE_V2_MODEL_RUNNER=1
export TRITON_F32_DEFAULT=ieee              # fp32 parity tests: no TF32 in Triton attention
export WS_GPU_RESULTS=$out/gpu-results.json
# the commit under test (a `git archive` copy carries it in a COMMIT file)
export WS_GPU_COMMIT=${WS_GPU_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null)}
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
if [ -n "${WS_GPU_FILES:-}" ]; then
  read -r -a files <<<"$WS_GPU_FILES"
else  # the core proofs first, then every other test file under tests/gpu
  files=(tests/gpu/test_text_gpu.py tests/gpu/test_vl_gpu.py tests/gpu/test_timing_bf16_gpu.py)
  for f in tests/gpu/test_*.py; do [[ " ${files[*]} " == *" $f "* ]] || files+=("$f"); done
fi
echo "test files: ${files[*]}"
budget=${WS_GPU_TIMEOUT:-$((570 - SECONDS))}
deadline=$((SECONDS + budget))
streams=${WS_GPU_STREAMS:-1}
pytest_args=(-p no:cacheprovider -s -v -rA)
if [ "$streams" -le 1 ]; then
  timeout --signal=INT "$budget" python3 -m pytest -m gpu "${pytest_args[@]}" --timeout 300 \
    "${files[@]}" "$@" 2>&1 | tee "$out/pytest.log"
  rc=${PIPESTATUS[0]}
else
  # WS_GPU_STREAMS=N (tests/gpu/streams.py): the gpu_exclusive tests first, alone; then the
  # others in N pytest processes at once, each with its own Ray and compile caches (so no
  # two processes write one autotuning result), per-test timeout raised for the sharing
  work=/tmp/ws-streams && rm -rf "$work" && mkdir -p "$work"
  WS_GPU_RESULTS=$work/results-exclusive.json timeout --signal=INT "$budget" python3 -m pytest \
    -m "gpu and gpu_exclusive" "${pytest_args[@]}" --timeout 300 "${files[@]}" "$@" \
    >"$work/log-exclusive.txt" 2>&1
  rc=$?; [ "$rc" -eq 5 ] && rc=0  # 5: no exclusive test among these files
  python3 -m pytest --collect-only -q -p no:cacheprovider -m "gpu and not gpu_exclusive" \
    "${files[@]}" "$@" 2>/dev/null | python3 -m tests.gpu.streams plan "$streams" "$work"
  pids=()
  left=$((deadline - SECONDS))
  shopt -s nullglob  # no plan (every test exclusive): no stream
  plans=("$work"/stream-*.txt)
  if [ "$left" -lt 30 ] && [ ${#plans[@]} -gt 0 ]; then
    echo "no time left for the streams"; rc=124; plans=()
  fi
  for plan in "${plans[@]}"; do
    i=$(basename "$plan" .txt); mapfile -t ids <"$plan"
    mkdir -p "$work/$i/triton" "$work/$i/inductor" "$work/$i/vllm"
    WS_GPU_RESULTS=$work/results-$i.json TRITON_CACHE_DIR=$work/$i/triton \
      TORCHINDUCTOR_CACHE_DIR=$work/$i/inductor VLLM_CACHE_ROOT=$work/$i/vllm \
      timeout --signal=INT "$left" python3 -m pytest \
      -m "gpu and not gpu_exclusive" "${pytest_args[@]}" --timeout 540 \
      --basetemp "$work/$i/tmp" "${ids[@]}" \
      >"$work/log-$i.txt" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; s=$?; [ "$s" -ne 0 ] && rc=$s; done
  for log in "$work"/log-*.txt; do echo "===== $log"; cat "$log"; done >"$out/pytest.log"
  grep -hE "^(PASSED|FAILED|ERROR) |^=+ .*(passed|failed|error)" "$work"/log-*.txt || true
  python3 -m tests.gpu.streams merge "$WS_GPU_RESULTS" "$work"/results-*.json
fi
# The engines' own logs (vLLM in Ray actors), for whatever failed.
tar czf "$out/ray-logs.tgz" -C /tmp/ray --wildcards 'session_2*/logs' 2>/dev/null && \
  [ "$(stat -c %s "$out/ray-logs.tgz")" -lt 15000000 ] || rm -f "$out/ray-logs.tgz"
echo "gpu suite exit code: $rc"
exit "$rc"
