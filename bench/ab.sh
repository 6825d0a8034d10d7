#!/usr/bin/env bash
# Branches against main on one GPU machine, alternated in one call, as docs/lab-notes.md's runs compare them.
#
#   bench/ab.sh pack NAME=REF...               (here) git archive each REF into $AB_DIR/NAME
#   bench/ab.sh wheels                         (here) the runtime packages the GPU image lacks, into $AB_DIR/wheels
#   bench/ab.sh run ROUNDS NAME... -- CMD...   (on the GPU) CMD in each tree in turn, ROUNDS times
#
# AB_DIR defaults to .ab in the repo root, which git ignores: a device call carries it (`carry: [".ab"]`) and
# runs e.g. `bench/ab.sh run 2 rel main -- python3 -m bench.throughput --modes latency`. Each CMD runs from
# its tree's root in a process of its own, the trees' code first on PYTHONPATH, so one machine's noise falls
# on every tree alike; `run` first installs the carried wheels (if any) into /tmp/ab-site.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AB_DIR=${AB_DIR:-$ROOT/.ab}
# What the GPU image lacks of pyproject's dependencies (it has torch, triton, transformers, grpcio 1.84,
# protobuf 7, xxhash, safetensors, numpy, prometheus-client, jinja2, tqdm); grpcio's plugins match its 1.84.
WHEELS=(grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 smg-grpc-proto==0.4.28 xgrammar==0.2.9
  apache-tvm-ffi==0.1.15.post2 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
  typing-inspection==0.4.2)

usage() {
  sed -n 2,6p "$0" >&2
  exit 2
}

pack() {
  [ $# -gt 0 ] || usage
  mkdir -p "$AB_DIR"
  for pair in "$@"; do
    local name=${pair%%=*} ref=${pair#*=}
    [ "$name" != "$pair" ] && [ "$name" != wheels ] || usage
    rm -rf "${AB_DIR:?}/$name" && mkdir -p "$AB_DIR/$name"
    git -C "$ROOT" archive "$ref" | tar -x -C "$AB_DIR/$name"
    echo "$name $(git -C "$ROOT" rev-parse --short "$ref")" | tee "$AB_DIR/$name/.ab-ref"
  done
}

wheels() {  # for the GPU image's Python 3.12 on x86-64
  local platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
  do platforms+=(--platform "$p"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$AB_DIR/wheels" "${WHEELS[@]}"
  ls "$AB_DIR/wheels"
}

run() {
  local rounds=${1:-}
  shift || true
  local names=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do names+=("$1"); shift; done
  [ $# -gt 1 ] && [ ${#names[@]} -gt 0 ] && [[ "$rounds" =~ ^[0-9]+$ ]] || usage
  shift
  local site=""
  if compgen -G "$AB_DIR/wheels/*.whl" >/dev/null; then
    site=/tmp/ab-site
    [ -d "$site" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$AB_DIR"/wheels/*.whl
  fi
  for r in $(seq "$rounds"); do
    for name in "${names[@]}"; do
      echo "=== $(cat "$AB_DIR/$name/.ab-ref") round $r: $*"
      (cd "$AB_DIR/$name" && PYTHONPATH=".${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 "$@") || echo "=== exit $?"
    done
  done
}

verb=${1:-}
shift || true
case "$verb" in
  pack | wheels | run) "$verb" "$@" ;;
  *) usage ;;
esac
