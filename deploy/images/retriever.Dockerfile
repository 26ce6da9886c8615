# The retrieval service (and the `rest` datastore commands) for CPU nodes: slim, non-root, the
# wheel built in a builder stage. Build from the repository root:
#   docker build -f deploy/images/retriever.Dockerfile -t rest-retriever .
# Pin the base images by digest in your registry mirror: --build-arg PYTHON_IMAGE=python@sha256:...
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

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
# The crates first: this layer is reused while only the sources change.
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

FROM ${PYTHON_IMAGE} AS install
COPY --from=wheel /wheels /wheels
COPY requirements.txt /tmp/requirements.txt
# Only what serving and building datastores need (no torch): the pinned versions of the
# requirements file, as a constraint.
RUN python -m venv /opt/rest \
    && /opt/rest/bin/pip install --no-cache-dir --constraint /tmp/requirements.txt \
       "$(ls /wheels/*.whl)[datastore]"

FROM ${PYTHON_IMAGE}
COPY --from=install /opt/rest /opt/rest
ENV PATH=/opt/rest/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric user, so that runAsNonRoot can be checked without runAsUser.
USER 10001:10001
WORKDIR /tmp
# gRPC, the plaintext health-only port, the search port (components/search-port), metrics.
EXPOSE 50051 50052 50053 9090
ENTRYPOINT ["retriever-server"]
CMD ["--help"]
