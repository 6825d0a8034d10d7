"""Helpers for driving a ModelRunner the way the scheduler would, and for the HF reference."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from worker_svc.config import WorkerConfig
from worker_svc.model_runner import ModelRunner
from worker_svc.seq_state import SamplingOptions, SeqState

BLOCK_SIZE = 4  # small, so short prompts span several blocks and partial last blocks
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 30], [int(t) for t in torch.arange(40, 400, 13)]]


def make_runner(model_dir: Path, rank: int = 0, world_size: int = 1, **overrides: object) -> ModelRunner:
    settings: dict = {"num_kv_blocks": 128, "block_size": BLOCK_SIZE, "tensor_parallel_size": world_size}
    return ModelRunner(WorkerConfig(str(model_dir), **{**settings, **overrides}), rank, world_size)


class Blocks:
    """Hands out fresh block ids, as a block manager with no prefix sharing would."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def take(self, tokens: int) -> list[int]:
        return [next(self._next) for _ in range(-(-tokens // BLOCK_SIZE))]


def new_seq(
    seq_id: int, prompt: list[int], blocks: Blocks, capacity: int, sampling: SamplingOptions | None = None
) -> SeqState:
    return SeqState(
        seq_id, list(prompt), len(prompt), 0, blocks.take(capacity), sampling or SamplingOptions(temperature=0)
    )


def outputs(seq: SeqState) -> list[int]:
    return seq.token_ids[seq.num_prompt_tokens :]


def generate(runner: ModelRunner, seqs: list[SeqState], max_new: int, chunk: int | None = None) -> None:
    """Steps every seq until it has max_new outputs, computing at most `chunk` tokens per seq a step."""
    while active := [s for s in seqs if len(outputs(s)) < max_new]:
        todo = [len(s.token_ids) - s.num_computed for s in active]
        runner.run(active, [min(n, chunk or n) for n in todo])


def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # the runner never stops; neither should the reference
    return model.eval()


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new)
    return out[0, len(prompt) :].tolist()
