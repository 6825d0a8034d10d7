#!/usr/bin/env bash
# Every GPU check and benchmark of one card, in one go, each step's log kept.
#
#   bench/gpu_suite.sh [LOG_DIR [STEP...]]   (from the repo root, on a machine with a GPU)
#
# Runs the kernel and worker correctness checks, the one-row GEMV timings (bench_gemv.py; its tile
# sweep is left out, being slow), decode attention by batch and row order (bench_decode.py; bf16 and fp8
# caches), the decode-step profile at batch 256 and 1, the timeline of a full-stack run (timeline.py; bf16
# and fp8 caches) and of the single request, the single request's host path against an emulated device
# (host_path.py), and the throughput benchmark (full stack, in-process, single-request latency; the full
# stack again with four tokens a streamed message, with the engine core in the scheduler process, with
# 10% of the requests constrained by a JSON schema (needs xgrammar), and with an fp8 KV cache), online serving
# at several request rates (serve), --compile against our fused kernels (compile_*), the workload
# while the worker is killed three times (chaos), and with two GPUs or more the tensor-parallel
# checks and benchmarks (tp_*, on Qwen3-8B and Qwen3-32B as well). STEPs pick some of them by name
# (default: all). A failing step is reported and the rest still run; the exit status is that of the
# last failure. docs/benchmarks.md says how to read the results.
set -u
LOG_DIR=${1:-${OUT:-/tmp}/gpu-suite}
shift || true
ONLY=" $* "
mkdir -p "$LOG_DIR"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
status=0

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
    echo "=== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    # Progress bars rewrite one line with carriage returns: keep the log's last lines readable.
    tr '\r' '\n' <"$LOG_DIR/$name.log" | grep -v 'it/s\]\|req/s\]' | tail -n 30
    grep "compiled a kernel variant after start-up" "$LOG_DIR/$name.log" | head -n 5  # a stall, and its cause
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    if [ "$rc" -ne 0 ]; then status=$rc; fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
step kernels 300 python3 tests/gpu/check_kernels.py
step worker 300 python3 tests/gpu/check_worker.py --prompts 32 --config bench/qwen3-0.6b/config.json
step gemv 120 python3 bench/bench_gemv.py --no-sweep
step decode 150 python3 bench/bench_decode.py
step decode_fp8 150 python3 bench/bench_decode.py --kv-cache-dtype fp8
step profile_256 200 python3 bench/profile_step.py --batch 256 --context 1024
step profile_1 200 python3 bench/profile_step.py --batch 1 --context 512
step throughput 400 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full,inproc,latency
step timeline 300 python3 -m bench.timeline
step timeline_fp8 300 python3 -m bench.timeline --kv-cache-dtype fp8
step timeline_single 200 python3 -m bench.timeline --single
step host_path 200 python3 -m bench.host_path --step-ms 0.5,1
step throughput_interval4 300 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full --stream-interval 4
step throughput_no_core 300 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full --no-core-process
step throughput_json 400 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full,json
step throughput_fp8 300 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full,inproc --stream-interval 4 --kv-cache-dtype fp8
# Online serving: Poisson arrivals of the standard prompts at several rates (bench/serve.py).
step serve 400 python3 -m bench.serve --model bench/qwen3-0.6b --rates 8,16,32,64,inf
# torch.compile's regions (--compile) against our fused kernels, the same runs both ways (steps compile_*).
step compile_profile_fused 200 python3 bench/profile_step.py --batch 1,64,256 --context 1024 --steps 30
step compile_profile 300 python3 bench/profile_step.py --batch 1,64,256 --context 1024 --steps 30 --compile
step compile_throughput_fused 300 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full,latency
step compile_throughput 300 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full,latency --compile
# The workload while the worker is killed three times (bench/chaos.py).
step chaos 600 python3 -m bench.chaos --model bench/qwen3-0.6b --device cuda --requests 256 --kills 3
# Tensor parallelism, on a machine with two GPUs or more (steps tp_*).
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    step tp_profile_256 150 python3 bench/profile_step.py --tp 2 --batch 256 --context 1024 --steps 30
    step tp_profile_1 150 python3 bench/profile_step.py --tp 2 --batch 1 --context 512 --steps 30
    step tp_throughput_2 300 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full --tp 2
    step tp_throughput_1 300 python3 -m bench.throughput --model bench/qwen3-0.6b --modes full --tp 1
    step tp_check 400 python3 tests/gpu/check_tp.py --tp 2
    # Where TP pays: Qwen3-8B (its matmuls dominate a step) and Qwen3-32B (64 GB of weights).
    step tp_8b_throughput_2 600 python3 -m bench.throughput --model bench/qwen3-8b --modes full,latency --tp 2
    step tp_8b_throughput_1 600 python3 -m bench.throughput --model bench/qwen3-8b --modes full,latency --tp 1
    step tp_32b_throughput_2 600 python3 -m bench.throughput --model bench/qwen3-32b --modes full,latency --tp 2
    step tp_8b_check 900 python3 tests/gpu/check_tp.py --tp 2 --config bench/qwen3-8b/config.json --prompts 16
    step tp_32b_check 900 python3 tests/gpu/check_tp.py --tp 2 --config bench/qwen3-32b/config.json --layers 8 --prompts 16
fi
exit $status
