"""Sizing and allocation of the paged KV cache: one tensor for all layers, viewed per layer as
k_cache and v_cache of [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import torch
from torch import nn

from worker_svc.attention.layer import PagedAttention


def _attention_layers(model: nn.Module) -> list[PagedAttention]:
    return [m for m in model.modules() if isinstance(m, PagedAttention)]


def block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across every layer, K and V, on this rank."""
    layers = _attention_layers(model)
    per_layer = 2 * block_size * layers[0].num_kv_heads * layers[0].head_dim * dtype.itemsize
    return per_layer * len(layers)


def cuda_budget(device: torch.device, utilization: float) -> int:
    """Bytes left for the cache on a GPU after a warm-up step has set the activation peak."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # so that free memory counts what is allocated, not what is cached
    free, total = torch.cuda.mem_get_info(device)
    activations = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    # total - free holds the weights, the CUDA context and any other process on this GPU.
    return int(total * utilization) - (total - free) - activations


def allocate(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Allocates the cache and binds each attention layer to its views of it."""
    layers = _attention_layers(model)
    shape = (2, len(layers), num_blocks, block_size, layers[0].num_kv_heads, layers[0].head_dim)
    # Zeros, not empty: the decode path reads whole blocks and masks the tail, and uninitialised
    # memory may hold NaNs that a mask multiplied by zero still lets through.
    cache = torch.zeros(shape, dtype=dtype, device=device)
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
    return cache
