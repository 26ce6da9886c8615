# The decoder worker for GPU nodes: `decoder-server` (the OpenAI-compatible API) on a CUDA
# runtime base, non-root, the wheel built in a builder stage. Build from the repository root:
#   docker build -f deploy/images/decoder.Dockerfile -t rest-decoder .
# Pin the base images by digest in your registry mirror (--build-arg PYTHON_IMAGE=...@sha256:...,
# --build-arg CUDA_IMAGE=...@sha256:...).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS wheel
ARG RUST_VERSION=1.95.0
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
ENV PATH=/root/.cargo/bin:${PATH}
WORKDIR /src
RUN pip install --no-cache-dir maturin==1.16.0
COPY retriever_rs/Cargo.toml retriever_rs/Cargo.lock retriever_rs/
COPY retriever_rs/core/Cargo.toml retriever_rs/core/
COPY retriever_rs/python/Cargo.toml retriever_rs/python/
RUN mkdir -p retriever_rs/core/src retriever_rs/python/src \
    && touch retriever_rs/core/src/lib.rs retriever_rs/python/src/lib.rs \
    && cargo fetch --locked --manifest-path retriever_rs/Cargo.toml
COPY pyproject.toml README.md requirements.txt ./
COPY proto proto
COPY retriever_rs retriever_rs
COPY rest rest
COPY retriever_service retriever_service
COPY decoder decoder
RUN maturin build --release --locked --out /wheels

# The virtual environment is made on the runtime base, so that its interpreter paths hold there.
FROM ${CUDA_IMAGE} AS install
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
COPY requirements.txt /tmp/requirements.txt
RUN python3.12 -m venv /opt/rest \
    && /opt/rest/bin/pip install --no-cache-dir --constraint /tmp/requirements.txt \
       "$(ls /wheels/*.whl)[decoder]"

FROM ${CUDA_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=install /opt/rest /opt/rest
ENV PATH=/opt/rest/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["decoder-server"]
CMD ["--help"]
