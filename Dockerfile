# One image for every role: compose runs it as the scheduler (no GPU) and as the worker(s).
# Run alone, it is `nanovllm serve`: docker run --gpus all -v /path/to/model:/model:ro -p 50051:50051 IMAGE
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Triton compiles a small C launcher when it first loads a kernel: it needs gcc and Python's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 nanovllm

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proto proto
COPY scheduler_svc scheduler_svc
COPY worker_svc worker_svc
COPY client/*.py client/
COPY nanovllm_grpc nanovllm_grpc
# The CUDA build of torch (PyPI's default on Linux) and the GPU extras (Triton).
RUN pip install '.[gpu]'

# Triton and torch write their kernel caches under $HOME.
USER nanovllm
EXPOSE 50051 50061 8000
HEALTHCHECK --interval=5s --timeout=5s --start-period=15m CMD ["nanovllm", "health", "--addr", "127.0.0.1:50051"]
CMD ["nanovllm", "serve", "--model", "/model", "--host", "0.0.0.0", "--metrics-port", "8000"]
