"""Qwen3 for causal LM over a flat batch of tokens.

A decoder layer is pre-norm attention then pre-norm SwiGLU MLP, each added to the residual. Layers
pass (hidden, residual) on and each norm does the pending add first (residual += hidden; hidden =
norm(residual)), so on CUDA the add and the norm are one fused kernel; the final norm takes the
last layer's add. Qwen3's attention normalises every query and key head (RMSNorm over head_dim)
before RoPE, and uses grouped-query attention: several query heads share one key/value head. On
CUDA one kernel does both norms and RoPE in place, and stores K/V in the paged cache where the
attention backend allows (PagedAttention.fused_store), saving the store's launch in every layer;
in a decode step on the Triton backend the attention kernel itself does all that
(PagedAttention.attend_rope), saving that kernel's launch too.
For a single row on CUDA (one sequence's decode) each norm and the SwiGLU gate run inside the
matmul that follows them (layers/linear.py's norm_forward and act_forward).
With `--compile` the layers run models/regions.py's torch functions, compiled, in place of all
that (use_regions). Module and parameter names follow the Hugging Face checkpoint, except the
merged projections named in `packed_modules`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from worker_svc.attention import AttentionBackend, AttnMetadata, QKNormRope
from worker_svc.attention.layer import PagedAttention
from worker_svc.layers.activation import SiluAndMul
from worker_svc.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker_svc.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker_svc.layers.norm import RMSNorm
from worker_svc.layers.parallel import tp_size
from worker_svc.layers.rotary import RotaryEmbedding, apply_rotary
from worker_svc.models.arch import ModelArch
from worker_svc.models.regions import Regions


class Qwen3Attention(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        tp = tp_size()
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads, arch.attention_bias
        )
        self.num_heads, self.num_kv_heads = arch.num_heads // tp, arch.num_kv_heads // tp
        self.head_dim = arch.head_dim
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, arch.attention_bias)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps)
        self.rotary = rotary  # one module shared by every layer: one copy of the tables
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, arch.head_dim, backend)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, positions: torch.Tensor, meta: AttnMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output, residual stream) of the layer input x + residual, normed by `norm`."""
        qkv, residual = self.qkv_proj.norm_forward(x, residual, norm)
        if qkv.is_cuda:
            # A decode step's attention kernel can norm and rotate q and k and store k and v itself.
            rope = QKNormRope(
                self.q_norm.weight, self.k_norm.weight, self.rotary.cos, self.rotary.sin, positions, self.q_norm.eps
            )
            out = self.attn.attend_rope(qkv, rope, meta)
            if out is not None:
                return self.o_proj(out.flatten(1)), residual
        # Otherwise, on CUDA, the q/k norm + RoPE kernel also writes k and v to the cache when the backend lets it.
        kv_cache = self.attn.fused_store(meta) if qkv.is_cuda else None
        q, k, v = self.qk_norm_rope(qkv, positions, kv_cache)
        out = self.attn(q, k, v, meta, stored=kv_cache is not None)
        return self.o_proj(out.flatten(1)), residual

    def qk_norm_rope(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, heads, D], k and v [T, kv_heads, D] from the qkv projection, q and k normed and rotated.
        kv_cache (CUDA only): PagedAttention.fused_store's caches and slots, to store k and v into."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k, v = k.view(-1, self.num_kv_heads, self.head_dim), v.view(-1, self.num_kv_heads, self.head_dim)
        if qkv.is_cuda:
            from worker_svc.layers.fused import qk_norm_rope  # imports triton: CUDA hosts only

            # One kernel, in place on qkv, so q and k (views of it) come out normed and rotated.
            # q_norm and k_norm share the model's eps.
            qk_norm_rope(
                qkv, positions, self.rotary.cos, self.rotary.sin, self.q_norm.weight, self.k_norm.weight,
                self.num_heads, self.num_kv_heads, self.q_norm.eps, kv_cache,
            )  # fmt: skip
            return q, k, v
        assert kv_cache is None, "the torch path leaves the store to PagedAttention"
        cos, sin = self.rotary(positions, qkv.dtype)
        return apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin), v


class Qwen3MLP(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        size = arch.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [size, size])
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, arch.hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream) of x + residual, normed by `norm`."""
        gate_up, residual = self.gate_up_proj.norm_forward(x, residual, norm)
        return self.down_proj.act_forward(gate_up, self.act), residual


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Qwen3Attention(arch, backend, rotary)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = Qwen3MLP(arch)

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, meta: AttnMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream before it): the MLP's add is left to the next norm."""
        hidden, residual = self.self_attn(hidden, residual, self.input_layernorm, positions, meta)
        return self.mlp(hidden, residual, self.post_attention_layernorm)

    def forward_regions(
        self, hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata, fn: Regions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward, with the work between attention and the row-parallel matmuls done by `fn`."""
        a, norm = self.self_attn, self.input_layernorm
        q, k, v, residual = fn.attn_in(
            hidden, residual, norm.weight, a.qkv_proj.weight, a.qkv_proj.bias, a.q_norm.weight, a.k_norm.weight,
            a.rotary.cos, a.rotary.sin, positions, norm.eps, a.num_heads, a.num_kv_heads,
        )  # fmt: skip
        hidden = a.o_proj(a.attn(q, k, v, meta).flatten(1))
        norm = self.post_attention_layernorm
        act, residual = fn.mlp_in(hidden, residual, norm.weight, self.mlp.gate_up_proj.weight, norm.eps)
        return self.mlp.down_proj(act), residual


class Qwen3Model(nn.Module):
    def __init__(self, arch: ModelArch, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(arch, backend, rotary) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.regions: Regions | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        if self.regions is not None:
            # The first layer's add of a zero residual is exact, and keeps one signature for every
            # layer: a None there would be a second graph to compile.
            residual = torch.zeros_like(hidden)
            for layer in self.layers:
                hidden, residual = layer.forward_regions(hidden, residual, positions, meta, self.regions)
            return self.regions.final_norm(hidden, residual, self.norm.weight, self.norm.eps)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, meta)
        return self.norm.add_norm(hidden, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    # Checkpoint tensors that land in a slice of one of our merged parameters:
    # checkpoint module name -> (our module name, shard id for its weight_loader).
    packed_modules: ClassVar[dict[str, tuple[str, int | str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, arch: ModelArch, backend: AttentionBackend, max_positions: int) -> None:
        super().__init__()
        self.model = Qwen3Model(arch, backend, max_positions)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of tokens input_ids [T] at positions [T]."""
        return self.model(input_ids, positions, meta)

    def use_regions(self, regions: Regions | None) -> None:
        """Runs every layer through `regions` (None: the layers' own forward)."""
        self.model.regions = regions

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's share of the logits of the rows to sample (see ParallelLMHead)."""
        return self.lm_head(hidden)
