"""Paged attention: the metadata, the backend interface, and the choice of backend."""

from __future__ import annotations

from worker_svc.attention import flash4_backend, flash_backend
from worker_svc.attention.backend import AttentionBackend, QKNormRope
from worker_svc.attention.metadata import AttnMetadata
from worker_svc.attention.torch_backend import TorchBackend

__all__ = ["AttentionBackend", "AttnMetadata", "QKNormRope", "get_backend"]


def get_backend(name: str, device: str, block_size: int = 16, half: bool = True) -> AttentionBackend:
    """The backend called `name`; "auto" picks the fastest one available on `device`: flash-attn 2.x
    when installed and usable (its paged cache needs blocks of a multiple of 256 tokens and fp16
    or bf16), else our Triton kernels on CUDA; torch on the CPU. "flash-attn" runs flash-attn 2.x
    where installed, else flash-attn-4, which "auto" leaves alone until a GPU run shows it pays."""
    if name == "auto":
        if device != "cuda":
            name = "torch"
        else:
            usable = half and block_size % 256 == 0 and flash_backend.installed()
            name = "flash-attn" if usable else "triton"
    if name == "torch":
        return TorchBackend()
    if device != "cuda":
        raise ValueError(f"attention backend {name!r} needs device 'cuda'")
    if name == "triton":
        from worker_svc.attention.triton_backend import TritonBackend  # imports triton: CUDA hosts only

        return TritonBackend()
    if name == "flash-attn":
        if flash4_backend.installed_version() is not None and not flash_backend.installed():
            return flash4_backend.FlashAttn4Backend()
        return flash_backend.FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r}; choose auto, torch, triton or flash-attn")
