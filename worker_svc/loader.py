"""Fills a model's parameters: from the *.safetensors of a Hugging Face checkpoint, each tensor
through its parameter's weight_loader so every rank keeps only its shard, or with random values
for benchmarks ("dummy")."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from worker_svc.layers.norm import RMSNorm

Packed = dict[str, tuple[str, int | str]]


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors in {model_dir}; use load_format='dummy' for random weights")
    params = dict(model.named_parameters())
    packed: Packed = getattr(model, "packed_modules", {})
    missing = _expected(params, packed)
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors file is no dict)
                target, shard = _target(name, packed)
                if target not in params:
                    if _skippable(name):
                        continue
                    raise ValueError(f"checkpoint tensor {name!r} matches no parameter of the model")
                param = params[target]
                loader = getattr(param, "weight_loader", _copy)
                loader(param, f.get_tensor(name), shard)
                missing.discard((target, shard))
    if missing:
        names = sorted(n if s is None else f"{n}[{s}]" for n, s in missing)
        raise ValueError(f"checkpoint in {model_dir} lacks: {', '.join(names)}")


def fill_dummy(model: nn.Module, seed: int) -> None:
    """Deterministic random weights: small normal matrices, unit norms, zero biases."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for _, param in sorted(model.named_parameters()):
        if id(param) in norms:
            param.data.fill_(1.0)
        elif param.dim() == 1:
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


def _copy(param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
    """Loader of parameters that every rank holds whole (norms)."""
    param.data.copy_(loaded)


def _target(name: str, packed: Packed) -> tuple[str, int | str | None]:
    """Our parameter name for a checkpoint tensor, and its shard id in a merged parameter."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in packed:
        ours, shard = packed[parts[-2]]
        return ".".join([*parts[:-2], ours, parts[-1]]), shard
    return name, None


def _expected(params: dict[str, nn.Parameter], packed: Packed) -> set[tuple[str, int | str | None]]:
    """Every (parameter, shard) the checkpoint must provide: one entry per part of a merged one."""
    shards: dict[str, list[int | str | None]] = {}
    for ours, shard in packed.values():
        shards.setdefault(ours, []).append(shard)
    return {(name, s) for name in params for s in shards.get(name.split(".")[-2], [None])}


def _skippable(name: str) -> bool:
    # Tied checkpoints may still ship lm_head.weight (a copy of the embedding the head shares), and
    # old ones ship RoPE frequencies, which we compute.
    return name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq")
