"""Paged attention: the metadata, the backend interface, and the choice of backend."""

from __future__ import annotations

import importlib.util

from worker_svc.attention.backend import AttentionBackend
from worker_svc.attention.metadata import AttnMetadata
from worker_svc.attention.torch_backend import TorchBackend

__all__ = ["AttentionBackend", "AttnMetadata", "get_backend"]


def get_backend(name: str, device: str) -> AttentionBackend:
    """The backend called `name`; "auto" picks the fastest one available on `device`:
    flash-attn when importable, else our Triton kernels on CUDA; torch on the CPU."""
    if name == "auto":
        if device != "cuda":
            name = "torch"
        else:
            name = "flash-attn" if importlib.util.find_spec("flash_attn") is not None else "triton"
    if name == "torch":
        return TorchBackend()
    if device != "cuda":
        raise ValueError(f"attention backend {name!r} needs device 'cuda'")
    if name == "triton":
        from worker_svc.attention.triton_backend import TritonBackend  # imports triton: CUDA hosts only

        return TritonBackend()
    if name == "flash-attn":
        from worker_svc.attention.flash_backend import FlashAttnBackend

        return FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch, triton or flash-attn")
