"""Where a rank's model lives and in what precision: its device, its dtype, and the checks that its
rank and world size agree with the process group."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist

from worker_svc.config import WorkerConfig
from worker_svc.models.arch import ModelArch


def check_group(config: WorkerConfig, rank: int, world_size: int) -> None:
    """Refuses a rank and world size that disagree with the config or with torch.distributed."""
    if world_size != config.tensor_parallel_size:
        raise ValueError(f"world_size {world_size} differs from tensor_parallel_size {config.tensor_parallel_size}")
    if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
        raise ValueError(f"world_size {world_size} needs torch.distributed initialised with that many ranks")
    if world_size > 1 and dist.get_rank() != rank:
        raise ValueError(f"rank {rank} differs from torch.distributed's rank {dist.get_rank()}")


def resolve_device(config: WorkerConfig) -> WorkerConfig:
    """The config with its device set: cuda when torch sees a GPU, else cpu."""
    if config.device is None:
        return replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' needs a GPU, and torch sees none (use --device cpu)")
    return config


def rank_device(config: WorkerConfig, rank: int) -> torch.device:
    """The device this rank drives, made current for the calling thread."""
    if config.device == "cpu":
        return torch.device("cpu")
    # One process per GPU of one host: rank r drives GPU r.
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def model_dtype(config: WorkerConfig, arch: ModelArch) -> torch.dtype:
    """The weights' and activations' dtype: the config's, else the checkpoint's on cuda, float32 on cpu."""
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if config.device == "cpu":
        return torch.float32
    return getattr(torch, arch.torch_dtype or "bfloat16")


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to `dtype` while the model's parameters are made."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
