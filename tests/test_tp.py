"""Tensor parallelism on CPU: two gloo ranks must produce the tokens one process does."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.runner_utils import PROMPTS, Blocks, generate, make_runner, new_seq, outputs
from tests.triton_interpreter import require_triton
from worker_svc.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker_svc.seq_state import SamplingOptions

pytestmark = pytest.mark.slow  # two ranks spawned over gloo, under the Triton interpreter

MAX_NEW = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _greedy(model_dir: Path, rank: int = 0, world_size: int = 1) -> tuple[list[list[int]], int]:
    """Greedy outputs of PROMPTS (prefill chunked to mix with decodes), and how many samples the
    first step returned on this rank."""
    runner = make_runner(model_dir, rank, world_size)
    blocks = Blocks()
    seqs = [new_seq(i, p, blocks, len(p) + MAX_NEW) for i, p in enumerate(PROMPTS)]
    first = runner.run(seqs, [len(p) for p in PROMPTS])
    generate(runner, seqs, MAX_NEW, chunk=5)
    return [outputs(s) for s in seqs], len(first)


def _uneven_vocab_error() -> float:
    """7 vocab rows over 2 ranks (4 + 3 padded): lookups and rank 0's logits must match the full table."""
    table = torch.arange(21, dtype=torch.float).view(7, 3)
    embed, head = VocabParallelEmbedding(7, 3), ParallelLMHead(7, 3)
    for layer in (embed, head):
        layer.weight.weight_loader(layer.weight, table)
    ids = torch.tensor([6, 0, 3, 4, 2])
    error = (embed(ids) - table[ids]).abs().max().item()
    logits = head.gather(head(table[ids]))
    if logits is not None:
        error = max(error, (logits - table[ids] @ table.T).abs().max().item())
    return error


SAMPLING = [
    SamplingOptions(temperature=0.8),
    SamplingOptions(temperature=1.0, seed=3),
    SamplingOptions(temperature=0),
]


def _sampled(model_dir: Path, rank: int, world_size: int) -> list[list[int]]:
    """Outputs of PROMPTS drawn by the Triton sampling kernel under the interpreter: at TP > 1 each
    rank draws from its vocabulary shard (ModelRunner._sample's sharded path)."""
    from tests.triton_interpreter import fix_interpreter
    from worker_svc.sampler import Sampler

    fix_interpreter()
    runner = make_runner(model_dir, rank, world_size)
    runner.sampler = Sampler(runner.device, 0, kernel=True)
    blocks = Blocks()
    seqs = [new_seq(i, p, blocks, len(p) + MAX_NEW, o) for i, (p, o) in enumerate(zip(PROMPTS, SAMPLING, strict=True))]
    generate(runner, seqs, MAX_NEW)
    return [outputs(s) for s in seqs]


def _sampling_main(rank: int, port: int, world_size: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        tokens = _sampled(Path(model_dir), rank, world_size)
        Path(out, f"tp{world_size}-rank{rank}.json").write_text(json.dumps(tokens))
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def test_two_ranks_sample_as_one(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temperature sampling at TP=2, where the ranks swap their shards' best candidates instead of
    gathering the logits, draws the tokens one process draws, on both ranks."""
    require_triton()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks import triton fresh
    for world_size in (1, 2):
        args = (_free_port(), world_size, str(tiny_model_dir), str(tmp_path))
        mp.spawn(_sampling_main, args=args, nprocs=world_size, join=True)
    single = json.loads((tmp_path / "tp1-rank0.json").read_text())
    assert len(set(map(tuple, single))) == 3 and all(len(t) == MAX_NEW for t in single)
    for rank in range(2):
        assert json.loads((tmp_path / f"tp2-rank{rank}.json").read_text()) == single


def _rank_main(rank: int, port: int, model_dirs: list[str], out: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = {"vocab_error": _uneven_vocab_error(), "runs": [_greedy(Path(d), rank, 2) for d in model_dirs]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one(tiny_model_dir: Path, tiny_untied_model_dir: Path, tmp_path: Path) -> None:
    dirs = [tiny_model_dir, tiny_untied_model_dir]
    mp.spawn(_rank_main, args=(_free_port(), [str(d) for d in dirs], str(tmp_path)), nprocs=2, join=True)
    single = [_greedy(d)[0] for d in dirs]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["vocab_error"] == 0
        for (tokens, first_samples), expected in zip(result["runs"], single, strict=True):
            assert tokens == expected  # rank 1 appended rank 0's tokens too
            assert first_samples == (len(PROMPTS) if rank == 0 else 0)
