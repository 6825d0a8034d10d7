"""Runs one worker process: one tensor-parallel rank holding weights and its share of the KV cache."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from concurrent import futures

import grpc

from proto import worker_pb2_grpc as wgrpc
from worker_svc.config import WorkerConfig
from worker_svc.servicer import WorkerServicer

log = logging.getLogger("worker")


def add_args(p: argparse.ArgumentParser) -> None:
    """Worker flags; `nanovllm serve` shares them."""
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--kvcache-block-size", type=int, default=16)
    p.add_argument("--num-kvcache-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache budget on cpu")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton", "flash-attn"))
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_config(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model=args.model,
        load_format=args.load_format,
        device=args.device or default_device(),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.kvcache_block_size,
        num_kv_blocks=args.num_kvcache_blocks,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend,
        tensor_parallel_size=args.tensor_parallel_size,
        seed=args.seed,
    )


def init_distributed(config: WorkerConfig, rank: int, dist_addr: str, dist_port: int) -> None:
    import torch
    import torch.distributed as dist

    if config.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://{dist_addr}:{dist_port}", rank=rank, world_size=config.tensor_parallel_size
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m worker_svc", description="nanovllm worker (one rank)")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--dist-addr", default="127.0.0.1", help="address of rank 0's process-group store")
    p.add_argument("--dist-port", type=int, default=29500)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    add_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker[{args.rank}] %(levelname)s %(message)s")
    config = worker_config(args)
    if not 0 <= args.rank < config.tensor_parallel_size:
        p.error(f"--rank must be in [0, {config.tensor_parallel_size}), got {args.rank}")

    servicer = WorkerServicer(args.rank, config.tensor_parallel_size, config.device)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)],
    )
    wgrpc.add_WorkerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    from worker_svc.model_runner import ModelRunner  # torch import after the port is taken

    if config.tensor_parallel_size > 1:
        init_distributed(config, args.rank, args.dist_addr, args.dist_port)
    servicer.runner = ModelRunner(config, args.rank, config.tensor_parallel_size)
    print(f"nanovllm worker rank {args.rank} ready on {args.host}:{bound} (pid {os.getpid()})", flush=True)
    stop.wait()
    server.stop(grace=1.0)
