"""Paged attention: the metadata, the backend interface, and the choice of backend."""

from __future__ import annotations

from worker_svc.attention.backend import AttentionBackend
from worker_svc.attention.metadata import AttnMetadata
from worker_svc.attention.torch_backend import TorchBackend

__all__ = ["AttentionBackend", "AttnMetadata", "get_backend"]


def get_backend(name: str, device: str) -> AttentionBackend:
    """The backend called `name`; "auto" picks the fastest one available on `device`."""
    if name in ("auto", "torch"):
        # Only the torch backend exists so far; "auto" will prefer faster kernels on cuda once they do.
        return TorchBackend()
    if name in ("triton", "flash-attn"):
        raise ValueError(f"attention backend {name!r} is not available yet; use 'torch' or 'auto'")
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch, triton or flash-attn")
