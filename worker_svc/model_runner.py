"""Runs steps of the model on this rank: builds the flat batch, runs the forward pass, samples,
and keeps every rank's copy of the sequences in step with rank 0's choices."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from worker_svc.attention import get_backend
from worker_svc.batch import prepare
from worker_svc.config import WorkerConfig
from worker_svc.kv_cache import allocate, block_bytes, cuda_budget
from worker_svc.loader import fill_dummy, load_weights
from worker_svc.models import MODELS
from worker_svc.models.arch import ModelArch
from worker_svc.sampler import Sampler
from worker_svc.seq_state import Sampled, SamplingOptions, SeqState


class ModelRunner:
    def __init__(self, config: WorkerConfig, rank: int = 0, world_size: int = 1) -> None:
        _check_group(config, rank, world_size)
        self.config, self.rank, self.world_size = config, rank, world_size
        arch = ModelArch.read(config.model)
        if arch.model_type not in MODELS:
            raise ValueError(f"model type {arch.model_type!r} is not supported; known: {', '.join(MODELS)}")
        self.max_model_len = config.max_model_len or arch.max_position_embeddings
        if self.max_model_len > arch.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's {arch.max_position_embeddings} positions"
            )
        self.block_size, self.vocab_size = config.block_size, arch.vocab_size
        self.device = _device(config, rank)
        self.dtype = _dtype(config, arch)
        with _default_dtype(self.dtype), self.device:
            self.model = MODELS[arch.model_type](
                arch, get_backend(config.attention_backend, config.device), self.max_model_len
            )
        if config.load_format == "dummy":
            fill_dummy(self.model, config.seed)
        else:
            load_weights(self.model, config.model)
        self.model.eval()
        self.sampler = Sampler(self.device, config.seed)
        self.num_kv_blocks = config.num_kv_blocks or self._budget_blocks()
        if self.num_kv_blocks < 1:
            raise ValueError("no memory is left for the KV cache; raise the memory budget or shrink the batch")
        self.kv_cache = allocate(self.model, self.num_kv_blocks, self.block_size, self.dtype, self.device)

    def run(self, seqs: list[SeqState], num_tokens: list[int]) -> list[Sampled]:
        """Computes num_tokens[i] more tokens of seqs[i] from seq.num_computed on, storing their K/V
        in the seq's blocks; every seq that reaches its last token samples one and appends it.

        Returns the samples in batch order on rank 0, [] on the other ranks, which take part in the
        collectives and append the token rank 0 broadcasts.
        """
        batch = prepare(seqs, num_tokens, self.block_size, self.max_model_len, self.device)
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions, batch.meta)
            for seq, n in zip(seqs, num_tokens, strict=True):
                seq.num_computed += n
            if not batch.samplers:
                return []
            sampling = [seqs[i] for i in batch.samplers]
            logits = self.model.compute_logits(hidden[batch.sample_rows])
            samples = self.sampler.sample(logits.float(), sampling) if logits is not None else []
            token_ids = self._share([s.token_id for s in samples], len(sampling))
        for seq, token_id in zip(sampling, token_ids, strict=True):
            seq.token_ids.append(token_id)
        return samples

    def _share(self, token_ids: list[int], count: int) -> list[int]:
        """Rank 0's sampled tokens, on every rank."""
        if self.world_size == 1:
            return token_ids
        tokens = torch.tensor(token_ids or [0] * count, dtype=torch.long, device=self.device)
        dist.broadcast(tokens, src=0)
        return tokens.tolist()

    def _budget_blocks(self) -> int:
        per_block = block_bytes(self.model, self.block_size, self.dtype)
        if self.device.type == "cpu":
            return int(self.config.kv_cache_memory_gb * 2**30) // per_block
        torch.cuda.reset_peak_memory_stats(self.device)
        self._warm_up()
        return cuda_budget(self.device, self.config.gpu_memory_utilization) // per_block

    def _warm_up(self) -> None:
        """One step as large as the scheduler may send: max_num_batched_tokens tokens spread over
        max_num_seqs seqs, all sampling, so activations and logits reach their peak. It runs
        before the cache exists: every seq starts from scratch, so attention needs no cache."""
        cfg = self.config
        tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * self.max_model_len)
        count = min(cfg.max_num_seqs, tokens)
        lengths = [tokens // count + (i < tokens % count) for i in range(count)]
        seqs = [
            SeqState(i, [0] * n, n, 0, [0] * -(-n // self.block_size), SamplingOptions()) for i, n in enumerate(lengths)
        ]
        self.run(seqs, lengths)


def _check_group(config: WorkerConfig, rank: int, world_size: int) -> None:
    if world_size != config.tensor_parallel_size:
        raise ValueError(f"world_size {world_size} differs from tensor_parallel_size {config.tensor_parallel_size}")
    if world_size > 1 and not (dist.is_initialized() and dist.get_world_size() == world_size):
        raise ValueError(f"world_size {world_size} needs torch.distributed initialised with that many ranks")
    if world_size > 1 and dist.get_rank() != rank:
        raise ValueError(f"rank {rank} differs from torch.distributed's rank {dist.get_rank()}")


def _device(config: WorkerConfig, rank: int) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    # One process per GPU of one host: rank r drives GPU r.
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _dtype(config: WorkerConfig, arch: ModelArch) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if config.device == "cpu":
        return torch.float32
    return getattr(torch, arch.torch_dtype or "bfloat16")


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
