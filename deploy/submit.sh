#!/usr/bin/env bash
# Submit the GRPO loop (or another entrypoint) to a Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 deploy/submit.sh --steps 100 --engines 2
#   RAY_ADDRESS=... deploy/submit.sh --no-wait --submission-id grpo-1 -- --steps 100
#   RAY_ADDRESS=... WEIGHTSYNC_ENTRYPOINT=services.serve deploy/submit.sh
#
# Arguments after `--` (or all of them, when there is no `--`) go to the entrypoint; those
# before `--` go to `ray job submit`. RAY_ADDRESS is the cluster's job API (dashboard port).
# WEIGHTSYNC_ENTRYPOINT picks the module (default services.grpo); RAY (default `ray`) is the
# ray binary to use. The job runs `python` from the cluster's PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray job API, e.g. http://127.0.0.1:8265}"
module=${WEIGHTSYNC_ENTRYPOINT:-services.grpo}
submit_args=()
if [[ " $* " == *" -- "* ]]; then
  while (($#)); do
    if [[ $1 == -- ]]; then shift; break; fi
    submit_args+=("$1"); shift
  done
fi
exec "${RAY:-ray}" job submit --address "$RAY_ADDRESS" --working-dir . \
  --runtime-env deploy/runtime_env.yaml "${submit_args[@]}" -- python -m "$module" "$@"
