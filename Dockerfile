# GPU image for weightsync: vLLM (CUDA) + Ray + this package, with the same entrypoints as the
# CPU box. Used by deploy/kuberay/*.yaml (image weightsync:0.1.0).
#
#   docker build -t weightsync:0.1.0 .
#   docker run --gpus all --shm-size 8g weightsync:0.1.0                          # GRPO loop
#   docker run --gpus all --shm-size 8g -p 8765:8765 -e WEIGHTSYNC_HOST=0.0.0.0 \
#     -e WEIGHTSYNC_TOKEN=... -e WEIGHTSYNC_MODEL=/models/policy -v /models:/models \
#     weightsync:0.1.0 python -m services.serve
#
# Entrypoints: python -m services.grpo (GRPO training loop), python -m services.serve (control
# plane, port 8765), python -m services.demo (plain sync demo), deploy/submit.sh (Ray job).
FROM vllm/vllm-openai:v0.24.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    TOKENIZERS_PARALLELISM=false \
    WEIGHTSYNC_PORT=8765
WORKDIR /app

# dependencies first (cached while only the code changes); vllm comes from the base image
COPY pyproject.toml README.md ./
COPY weightsync ./weightsync
RUN python3 -m pip install --no-cache-dir ".[gpu,test]" \
 && (command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python)

COPY services ./services
COPY deploy ./deploy
COPY benchmarks ./benchmarks

EXPOSE 6379 8265 10001 8765
# the base image's entrypoint is `vllm serve`; ours are plain commands (KubeRay runs `ray start`)
ENTRYPOINT []
CMD ["python", "-m", "services.grpo", "--device", "cuda"]
