"""Steps replayed from CUDA graphs (worker_svc/cuda_graph.py): which captured shape a step takes, and
that a step padded into a shape computes what the same step computes eagerly.

The padded runs go through the real Qwen3 forward with the fused Triton kernels and the Triton
attention backend, run by Triton's CPU interpreter (in a subprocess, as in test_fused_kernels.py):
a graph replays exactly those launches, so a padding token that stored its K/V, a padding seq that
a kernel read, or a launch that depended on the host lists would show here as a wrong output or cache.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.triton_interpreter import IN_INTERPRETER, require_triton, run_under_interpreter
from worker_svc.batch import prepare
from worker_svc.cuda_graph import Shape, StepGraphs, prefill_shapes, prefill_tokens
from worker_svc.seq_state import SamplingOptions, SeqState

BLOCK_SIZE, MAX_LEN = 4, 64
needs_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the interpreter subprocess")


def test_prefill_shapes() -> None:
    assert prefill_tokens(2048) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048]
    assert prefill_tokens(300) == [16, 32, 64, 128, 256, 300] and prefill_tokens(16) == [16]
    shapes = prefill_shapes(2048, 256)
    assert [s.tokens for s in shapes if s.seqs == 1] == prefill_tokens(2048)
    assert [s.seqs for s in shapes if s.tokens == 16] == [1, 4, 16]
    assert [s.seqs for s in shapes if s.tokens == 2048] == [1, 4, 16, 64, 256]
    assert not any(s.decode for s in shapes)
    assert [(s.tokens, s.seqs) for s in prefill_shapes(100, 8)] == [
        (16, 1), (16, 4), (16, 8), (32, 1), (32, 4), (32, 8), (64, 1), (64, 4), (64, 8), (100, 1), (100, 4), (100, 8)
    ]  # fmt: skip
    assert prefill_shapes(0, 256) == [] and prefill_shapes(8, 256) == []


def seq(seq_id: int, tokens: list[int], computed: int, first_block: int) -> SeqState:
    table = list(range(first_block, first_block + -(-MAX_LEN // BLOCK_SIZE)))
    return SeqState(seq_id, tokens, len(tokens), computed, table, SamplingOptions(temperature=0))


def test_pick_takes_the_smallest_shape_that_holds_the_step() -> None:
    graphs = StepGraphs(nn.Identity(), 8, 100, 16, MAX_LEN, torch.device("cpu"))

    def pick(counts: list[int]) -> Shape | None:
        seqs = [seq(i, [1] * 60, 60 - n, 16 * i) for i, n in enumerate(counts)]
        return graphs.pick(prepare(seqs, counts, BLOCK_SIZE, MAX_LEN, torch.device("cpu")))

    assert pick([1, 1, 1]) == Shape(4, 4, True)
    assert pick([1] * 8) == Shape(8, 8, True)
    assert pick([20]) == Shape(32, 1, False)
    assert pick([1, 1, 10]) == Shape(16, 4, False)
    assert pick([1, 1, 1, 1, 1, 1, 1, 2]) == Shape(16, 8, False)
    assert pick([50, 50]) == Shape(100, 4, False)
    assert pick([51, 50]) is None  # more tokens than the largest prefill graph: eager


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="already inside the interpreter run")
def test_padded_steps_under_interpreter() -> None:
    require_triton()
    run_under_interpreter(__file__)


@needs_interpreter
def test_padded_steps_match_eager_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed step (two decodes and a prefill chunk), the chunk's end beside a fresh prompt, and a
    decode step, each run eagerly and padded into a larger shape from the same cache: the same
    hidden states for the real tokens, and the same cache (the padding stores nothing)."""
    from tests.test_fused_kernels import tiny_model
    from tests.triton_interpreter import fix_interpreter
    from worker_svc.attention.triton_backend import TritonBackend
    from worker_svc.kv_cache import allocate

    fix_interpreter()
    cpu = torch.device("cpu")
    model = tiny_model(torch.float32, TritonBackend(num_sms=1))  # 1 SM: the decode split-K path
    cache = allocate(model, 64, BLOCK_SIZE, torch.float32, cpu)
    graphs = StepGraphs(model, 4, 32, 16, MAX_LEN, cpu)
    gen = torch.Generator().manual_seed(6)
    a, b, c, d = (seq(i, torch.randint(0, 64, (n,), generator=gen).tolist(), 0, 16 * i) for i, n in
                  enumerate([11, 6, 25, 7]))  # fmt: skip
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the fused kernels' path
    with torch.inference_mode():
        model(*args_of(prepare([a, b], [10, 5], BLOCK_SIZE, MAX_LEN, cpu)))  # their prefixes, eagerly
        for s, n in ((a, 10), (b, 5)):
            s.num_computed = n
        steps = [([a, b, c], [1, 1, 18], Shape(32, 4, False)), ([c, d], [7, 7], Shape(16, 4, False))]
        steps.append(([a, b, c], [1, 1, 1], Shape(4, 4, True)))
        for seqs, counts, shape in steps:
            batch = prepare(seqs, counts, BLOCK_SIZE, MAX_LEN, cpu)
            assert graphs.pick(batch) == shape
            before = cache.clone()
            eager, eager_cache = model(*args_of(batch)), cache.clone()
            cache.copy_(before)
            graphs.load(batch, shape)
            padded = model(*graphs.args(shape))
            n = batch.input_ids.numel()
            torch.testing.assert_close(padded[:n], eager, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache, eager_cache, rtol=1e-5, atol=1e-5)
            assert padded.shape[0] == shape.tokens
            for s, k in zip(seqs, counts, strict=True):
                s.num_computed += k
                if s.num_computed == len(s.token_ids):  # the next step decodes a known token
                    s.token_ids.append(int(torch.randint(0, 64, (), generator=gen)))


def args_of(batch: object) -> tuple:
    return batch.input_ids, batch.positions, batch.meta  # type: ignore[attr-defined]
