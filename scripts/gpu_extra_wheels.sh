#!/usr/bin/env bash
# The wheels this project's GPU tests need beyond the shared staging list (../shared/gpu:
# stage.sh writes .whl/c01..c08), downloaded here into .whl/c10 for the lent GPU machine,
# which has no network (Python 3.12, x86_64):
#   peft, accelerate                      the LoRA tests (the trainer's adapters)
#   compressed-tensors, loguru            any quantized engine: vLLM 0.24's quantization
#                                         registry imports them even for quantization="fp8"
#   watchfiles, model-hosting-container-standards, jmespath, supervisor,
#   prometheus-fastapi-instrumentator
#                                         vLLM 0.24's OpenAI app (entrypoints/openai/
#                                         api_server.py and what it imports, its build_app's
#                                         function-level imports included: the last one was
#                                         found so, by a scan of the vLLM wheel's import graph)
# On the GPU machine: carry .whl/c10, then
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/c10/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/c10
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl/c10 \
  peft==0.21.0 accelerate==1.16.0 compressed-tensors==0.17.0 loguru==0.7.3 \
  watchfiles==1.3.0 model-hosting-container-standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0 \
  prometheus-fastapi-instrumentator==8.1.0
ls .whl/c10
