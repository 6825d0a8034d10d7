"""The architecture numbers of a checkpoint, read from its config.json without transformers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str | None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Each rank holds whole heads and an equal share of the MLP, so the TP size must divide them."""
        for name, count in (
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
        ):
            if count % tp_size:
                raise ValueError(f"the model's {name} ({count}) is not divisible by tensor_parallel_size ({tp_size})")

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelArch:
        raw: dict[str, Any] = json.loads((Path(model_dir) / "config.json").read_text())
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only SiLU MLPs are supported; config.json has {raw['hidden_act']!r}")
        if raw.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        heads = raw["num_attention_heads"]
        return cls(
            model_type=raw["model_type"],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            max_position_embeddings=raw["max_position_embeddings"],
            rms_norm_eps=raw["rms_norm_eps"],
            rope_theta=_rope_theta(raw),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            attention_bias=raw.get("attention_bias", False),
            # transformers 5 writes "dtype"; older checkpoints say "torch_dtype".
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers 5 nests RoPE settings under rope_parameters; older files keep rope_theta and
    # rope_scaling at the top level.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise ValueError(f"RoPE scaling {kind!r} is not supported; only plain RoPE is")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
