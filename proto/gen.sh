#!/usr/bin/env bash
# Regenerates the Python stubs, which are committed so that machines without grpcio-tools
# (the GPU hosts) can import them. Pinned to grpcio-tools 1.84.0: stubs from a newer generator
# refuse to import with the grpcio 1.84 runtime those hosts have.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
  proto/generate.proto proto/worker.proto
