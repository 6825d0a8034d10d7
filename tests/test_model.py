"""The worker's Qwen3 and ModelRunner against Hugging Face transformers on the same weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.runner_utils import (
    BLOCK_SIZE,
    PROMPTS,
    Blocks,
    generate,
    hf_greedy,
    hf_model,
    make_runner,
    new_seq,
    outputs,
)
from worker_svc.attention.layer import PagedAttention
from worker_svc.attention.torch_backend import TorchBackend
from worker_svc.batch import prepare
from worker_svc.seq_state import SamplingOptions, SeqState

MAX_NEW = 20


@pytest.fixture(scope="module", params=["tied", "untied"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue("tiny_model_dir" if request.param == "tied" else "tiny_untied_model_dir")


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> torch.nn.Module:
    return hf_model(model_dir)


@pytest.fixture(scope="module")
def reference(hf: torch.nn.Module) -> list[list[int]]:
    return [hf_greedy(hf, p, MAX_NEW) for p in PROMPTS]


def test_logits_match_hf(model_dir: Path, hf: torch.nn.Module) -> None:
    runner = make_runner(model_dir)
    blocks = Blocks()
    seqs = [new_seq(i, p, blocks, len(p)) for i, p in enumerate(PROMPTS)]
    batch = prepare(seqs, [len(p) for p in PROMPTS], BLOCK_SIZE, runner.max_model_len, runner.device)
    with torch.inference_mode():
        logits = runner.model.compute_logits(runner.model(batch.input_ids, batch.positions, batch.meta))
        expected = torch.cat([hf(torch.tensor([p])).logits[0] for p in PROMPTS])
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


def test_prefill_runs_before_the_cache_exists(tiny_model_dir: Path) -> None:
    # The CUDA warm-up measures peak memory with a from-scratch prefill before allocating the cache.
    runner = make_runner(tiny_model_dir)
    seqs = [new_seq(i, p, Blocks(), len(p)) for i, p in enumerate(PROMPTS)]
    batch = prepare(seqs, [len(p) for p in PROMPTS], BLOCK_SIZE, runner.max_model_len, runner.device)
    with torch.inference_mode():
        cached = runner.model(batch.input_ids, batch.positions, batch.meta)
        for layer in runner.model.modules():
            if isinstance(layer, PagedAttention):
                layer.k_cache = layer.v_cache = torch.empty(0)
        uncached = runner.model(batch.input_ids, batch.positions, batch.meta)
    assert torch.equal(cached, uncached)


def test_greedy_matches_hf(model_dir: Path, reference: list[list[int]]) -> None:
    runner = make_runner(model_dir)
    blocks = Blocks()
    seqs = [new_seq(i, p, blocks, len(p) + MAX_NEW) for i, p in enumerate(PROMPTS)]
    generate(runner, seqs, MAX_NEW)
    assert [outputs(s) for s in seqs] == reference


def test_chunked_prefill_matches_hf(model_dir: Path, reference: list[list[int]]) -> None:
    # Chunks of 3: prompts finish prefill at different steps, so later steps mix chunks and decodes.
    runner = make_runner(model_dir)
    blocks = Blocks()
    seqs = [new_seq(i, p, blocks, len(p) + MAX_NEW) for i, p in enumerate(PROMPTS)]
    first = runner.run(seqs, [3, 2, 3])
    assert [s.seq_id for s in first] == [1]  # only the 2-token prompt completed its prefill
    assert [s.num_computed for s in seqs] == [3, 2, 3]
    generate(runner, seqs, MAX_NEW, chunk=3)
    assert [outputs(s) for s in seqs] == reference


def test_cached_prefix_matches_hf(model_dir: Path, hf: torch.nn.Module, reference: list[list[int]]) -> None:
    runner = make_runner(model_dir)
    blocks = Blocks()
    long_prompt = PROMPTS[2]
    first = new_seq(0, long_prompt, blocks, len(long_prompt) + MAX_NEW)
    runner.run([first], [len(long_prompt)])
    # A second prompt shares 4 full blocks with the first: its table starts with the first's blocks
    # and only the rest is computed, while the first seq keeps decoding in the same batches.
    shared = 4 * BLOCK_SIZE
    prompt = [*long_prompt[:shared], 3, 1, 4, 1, 5]
    second = SeqState(
        1, list(prompt), len(prompt), shared, first.block_table[:4] + blocks.take(MAX_NEW + 8), SamplingOptions(0.0)
    )
    generate(runner, [first, second], MAX_NEW)
    assert outputs(first) == reference[2]
    assert outputs(second) == hf_greedy(hf, prompt, MAX_NEW)


def test_prefill_joins_running_decodes(model_dir: Path, reference: list[list[int]]) -> None:
    runner = make_runner(model_dir)
    blocks = Blocks()
    seqs = [new_seq(i, p, blocks, len(p) + MAX_NEW) for i, p in enumerate(PROMPTS)]
    generate(runner, seqs[:1], 5)
    # One batch: seq 0 decodes, seq 1 prefills whole, seq 2 prefills its first chunk.
    samples = runner.run(seqs, [1, len(PROMPTS[1]), 10])
    assert [s.seq_id for s in samples] == [0, 1]
    generate(runner, seqs, MAX_NEW)
    assert [outputs(s) for s in seqs] == reference


def test_decode_steps_three_deep_match_hf(model_dir: Path, reference: list[list[int]]) -> None:
    # Three steps in flight: each step is launched while the two before it are unread, so a seq
    # has two tokens on the device and its input is always the newest one, from its slot.
    runner = make_runner(model_dir)
    blocks = Blocks()
    seqs = [new_seq(i, p, blocks, len(p) + MAX_NEW) for i, p in enumerate(PROMPTS)]
    runner.run(seqs, [len(p) for p in PROMPTS])
    launched = []
    for _ in range(MAX_NEW - 1):
        launched.append(runner.launch(seqs, [1] * len(seqs)))
        if len(launched) == 3:
            runner.collect(launched.pop(0))
    assert [s.num_pending for s in seqs] == [2] * len(seqs)
    for pending in launched:
        runner.collect(pending)
    assert [outputs(s) for s in seqs] == reference


def test_seeded_sampling_survives_batching_and_recompute(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir)
    blocks = Blocks()
    opts = SamplingOptions(temperature=1.0, seed=1234)
    alone = new_seq(0, PROMPTS[0], blocks, len(PROMPTS[0]) + 12, opts)
    generate(runner, [alone], 12)
    others = [new_seq(i, p, blocks, len(p) + 12, SamplingOptions(temperature=1.0)) for i, p in enumerate(PROMPTS)]
    batched = new_seq(9, PROMPTS[0], blocks, len(PROMPTS[0]) + 12, opts)
    generate(runner, [others[2], batched, others[1]], 6)
    # Preempted after 6 tokens: the seq comes back with them as part of its tokens, recomputed.
    resumed = SeqState(9, list(batched.token_ids), len(PROMPTS[0]), 0, blocks.take(len(batched.token_ids) + 6), opts)
    generate(runner, [others[0], resumed], 12)
    assert outputs(resumed) == outputs(alone)
    assert len(set(outputs(alone))) > 3  # really sampled, not a constant


def test_dummy_weights_build_and_run(tiny_model_dir: Path) -> None:
    tokens = []
    for _ in range(2):
        runner = make_runner(tiny_model_dir, load_format="dummy", seed=7)
        seqs = [new_seq(i, p, Blocks(), len(p) + 4) for i, p in enumerate(PROMPTS)]
        generate(runner, seqs, 4)
        tokens.append([outputs(s) for s in seqs])
    assert tokens[0] == tokens[1]  # the same seed gives the same weights
    assert all(0 <= t < runner.vocab_size for seq in tokens[0] for t in seq)


def test_kv_budget_sizes_the_cache(tiny_model_dir: Path) -> None:
    # 2 layers * K and V * 4 tokens * 2 kv heads * 16 dims * 4 bytes = 2 KiB a block.
    runner = make_runner(tiny_model_dir, num_kv_blocks=None, kv_cache_memory_gb=1 / 1024)
    assert runner.num_kv_blocks == 512
    assert runner.kv_cache.shape == (2, 2, 512, BLOCK_SIZE, 2, 16)


def test_fp8_kv_cache_holds_four_times_the_blocks_and_stays_close(tiny_model_dir: Path) -> None:
    # The model is fp32: an fp8 cache takes a quarter of the bytes, so the same budget holds 4x.
    full = make_runner(tiny_model_dir, num_kv_blocks=None, kv_cache_memory_gb=1 / 1024)
    fp8 = make_runner(tiny_model_dir, num_kv_blocks=None, kv_cache_memory_gb=1 / 1024, kv_cache_dtype="fp8")
    assert fp8.kv_cache.dtype == torch.float8_e4m3fn and fp8.num_kv_blocks == 4 * full.num_kv_blocks
    logits = []
    for runner in (full, fp8):
        seq = new_seq(0, PROMPTS[2], Blocks(), len(PROMPTS[2]) + 1)
        runner.run([seq], [len(PROMPTS[2])])  # the prompt's K/V go to the cache (rounded to fp8)
        batch = prepare([seq], [1], BLOCK_SIZE, runner.max_model_len, runner.device)
        with torch.inference_mode():  # a decode step: attention reads the whole context from the cache
            logits.append(runner.model.compute_logits(runner.model(batch.input_ids, batch.positions, batch.meta)))
    error = ((logits[1] - logits[0]).abs().max() / logits[0].abs().max()).item()
    assert 1e-5 < error < 0.1  # rounded (not a copy of the fp32 run), yet close
    # Values past fp8's range saturate rather than become NaN, which would poison attention. (On
    # the CPU torch's own cast saturates too; the Triton stores' clamp is held to this on the GPU
    # by tests/gpu/check_kernels.py, where it failed before the clamp was added.)
    backend, cache = TorchBackend(), torch.zeros(1, 1, 1, 4, dtype=torch.float8_e4m3fn)
    kv = torch.tensor([[[1000.0, -1000.0, 448.0, 0.5]]])
    meta = prepare([new_seq(0, [1], Blocks(), 1)], [1], BLOCK_SIZE, 16, torch.device("cpu")).meta
    backend.store(kv, kv, cache, cache.clone(), replace(meta, slot_mapping=torch.tensor([0])))
    assert cache.float().flatten().tolist() == [448.0, -448.0, 448.0, 0.5]


def test_rejects_steps_past_the_seq_or_its_blocks(tiny_model_dir: Path) -> None:
    runner = make_runner(tiny_model_dir)
    seq = SeqState(0, [1, 2, 3, 4, 5], 5, 0, [0], SamplingOptions(0.0))
    with pytest.raises(ValueError, match="blocks cannot hold"):
        runner.run([seq], [5])
    with pytest.raises(ValueError, match="cannot compute"):
        runner.run([seq], [6])
