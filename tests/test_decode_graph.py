"""Whole-step decode graphs (worker_svc/decode_graph.py): which steps qualify, the inputs one copy
brings, and the tokens they leave in the last-token buffer. The graph body runs eagerly here: on a
stand-in model whose logits name the input token and position, so every input shows in the output,
and (in the interpreter subprocess) on the real Qwen3 forward with the Triton kernels a graph
replays, against the general path's step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.triton_interpreter import IN_INTERPRETER, require_triton, run_under_interpreter
from worker_svc.attention import AttnMetadata
from worker_svc.batch import prepare
from worker_svc.decode_graph import DecodeGraphs
from worker_svc.sampler import Sampler
from worker_svc.seq_state import SamplingOptions, SeqState

VOCAB, BLOCK, MAX_LEN, SLOTS = 50, 4, 64, 9  # 8 slots to hand out and the padding rows' one


class Echo(nn.Module):
    """Logits whose argmax is (token + position + 1) % VOCAB; keeps each call's metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.metas: list[AttnMetadata] = []

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        self.metas.append(meta)
        return ((ids + positions + 1) % VOCAB).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(hidden.long(), VOCAB).float()


def greedy(logits: torch.Tensor, temps: torch.Tensor, seeds: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    assert (temps == 0).all() and seeds.dtype == torch.int64
    return torch.argmax(logits, -1, out=out)


class OnePass(Sampler):
    """The CPU sampler, claiming the one-pass kernel's rows as a GPU's would."""

    def one_pass(self, seqs: list[SeqState], vocab: int) -> bool:
        return all(s.sampling.repetition_penalty == 1 for s in seqs)


def graphs(model: nn.Module) -> tuple[DecodeGraphs, torch.Tensor]:
    last = torch.zeros(SLOTS, dtype=torch.long)
    cpu = torch.device("cpu")
    return DecodeGraphs(model, greedy, OnePass(cpu, 0), VOCAB, last, 8, MAX_LEN // BLOCK, BLOCK, MAX_LEN), last


def decoding(seq_id: int, prompt: int, slot: int, first_block: int, last: torch.Tensor, token: int) -> SeqState:
    """A seq whose prompt is computed and whose first output (`token`) is still on the device."""
    table = list(range(first_block, first_block + 3))
    s = SeqState(seq_id, [1] * prompt, prompt, prompt, table, SamplingOptions(temperature=0))
    s.slot, s.held, s.num_pending = slot, prompt, 1
    last[slot] = token
    return s


def test_a_step_feeds_the_device_tokens_and_keeps_the_new_ones() -> None:
    model = Echo()
    g, last = graphs(model)
    a, b, c = decoding(0, 5, 3, 10, last, 7), decoding(1, 9, 0, 20, last, 11), decoding(2, 2, 5, 30, last, 4)
    tokens, done = g.launch([a, b, c], [1, 1, 1])  # type: ignore[misc]
    assert done is None  # no event on the CPU
    assert tokens.tolist() == [(7 + 5 + 1) % VOCAB, (11 + 9 + 1) % VOCAB, (4 + 2 + 1) % VOCAB]
    assert [last[3].item(), last[0].item(), last[5].item()] == tokens.tolist()
    meta = model.metas[-1]
    assert meta.seq_lens.tolist() == [6, 10, 3, 1]  # padded to 4 rows; the padding row sees one token
    assert meta.slot_mapping.tolist() == [11 * BLOCK + 1, 22 * BLOCK + 1, 30 * BLOCK + 2, -1]
    assert meta.decode_order.tolist() == [1, 0, 2, 3]  # longest first, padding last
    tables = meta.block_tables.tolist()  # each row's blocks up to its new token's; the rest unread
    assert (tables[0][:2], tables[1][:3], tables[2][:1]) == ([10, 11], [20, 21, 22], [30])
    assert meta.block_tables[3, 0] == 0 and meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    for s, held in ((a, 6), (b, 10), (c, 3)):
        assert (s.num_computed, s.held, s.num_pending) == (held, held, 2)
    # The next step reads the tokens this one left on the device.
    again, _ = g.launch([a, b, c], [1, 1, 1])  # type: ignore[misc]
    assert again.tolist() == [(t + p + 1) % VOCAB for t, p in zip(tokens.tolist(), [6, 10, 3], strict=True)]


@pytest.mark.parametrize(
    "change",
    [
        lambda s: setattr(s, "held", -1),  # its input token's value is not in its slot
        lambda s: setattr(s, "num_pending", 2),  # the step would not sample the seq's next token
        lambda s: setattr(s, "matcher", object()),  # constrained: its mask needs the host
        lambda s: setattr(s.sampling, "repetition_penalty", 1.2),  # not the kernel alone
        lambda s: setattr(s, "block_table", [10]),  # no room in its blocks
    ],
)
def test_steps_that_do_not_qualify_queue_nothing(change) -> None:
    model = Echo()
    g, last = graphs(model)
    a, b = decoding(0, 5, 3, 10, last, 7), decoding(1, 9, 0, 20, last, 11)
    change(b)
    before = (a.num_computed, a.num_pending, b.num_computed, b.num_pending)
    assert g.launch([a, b], [1, 1]) is None
    assert not model.metas and (a.num_computed, a.num_pending, b.num_computed, b.num_pending) == before


def test_only_one_token_steps_of_a_few_seqs_qualify() -> None:
    g, last = graphs(Echo())
    a = decoding(0, 5, 3, 10, last, 7)
    assert g.launch([a], [2]) is None
    many = [decoding(i, 5, i % 8, 4 * i, last, 1) for i in range(9)]  # over the largest graph (8)
    assert g.launch(many, [1] * 9) is None


@pytest.mark.slow
@pytest.mark.skipif(IN_INTERPRETER, reason="already inside the interpreter run")
def test_real_forward_under_interpreter() -> None:
    require_triton()
    run_under_interpreter(__file__)


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the interpreter subprocess")
def test_whole_step_matches_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three seqs (greedy, and two seeded at temperature 0.8) decode one step both ways from the same
    cache: the general path (prepare, the forward, the LM head, the sampler's kernel) and the whole
    step padded to four rows. The same tokens, and the same cache (the padding row stores nothing)."""
    from tests.test_fused_kernels import tiny_model
    from tests.triton_interpreter import fix_interpreter
    from worker_svc.attention.triton_backend import TritonBackend
    from worker_svc.kv_cache import allocate
    from worker_svc.layers.embedding import ParallelLMHead
    from worker_svc.sampling_kernel import sample_tokens

    class WithHead(nn.Module):  # the tiny Qwen3Model with its tied LM head, as Qwen3ForCausalLM
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model, self.lm_head = model, ParallelLMHead(64, model.embed_tokens.weight.size(1))
            self.lm_head.weight = model.embed_tokens.weight

        def forward(self, *args: object) -> torch.Tensor:
            return self.model(*args)

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.lm_head(hidden)

    fix_interpreter()
    cpu = torch.device("cpu")
    model = WithHead(tiny_model(torch.float32, TritonBackend(num_sms=1)))
    cache = allocate(model, 32, BLOCK, torch.float32, cpu)
    sampler = Sampler(cpu, 0, kernel=True)
    last = torch.zeros(SLOTS, dtype=torch.long)
    g = DecodeGraphs(model, sample_tokens, sampler, 64, last, 8, MAX_LEN // BLOCK, BLOCK, MAX_LEN)
    gen = torch.Generator().manual_seed(2)
    temps = [0.0, 0.8, 0.8]
    seqs = [
        SeqState(i, torch.randint(0, 64, (n,), generator=gen).tolist(), n, 0, list(range(8 * i, 8 * i + 8)),
                 SamplingOptions(temperature=t, seed=i))
        for i, (n, t) in enumerate(zip([9, 5, 13], temps, strict=True))
    ]  # fmt: skip
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the fused kernels' path
    with torch.inference_mode():
        batch = prepare(seqs, [len(s.token_ids) for s in seqs], BLOCK, MAX_LEN, cpu)
        model(batch.input_ids, batch.positions, batch.meta)  # the prompts' K/V
        for slot, s in zip((4, 0, 6), seqs, strict=True):
            s.num_computed, s.slot, s.held = len(s.token_ids) - 1, slot, len(s.token_ids) - 1
            last[slot] = s.token_ids[-1]  # as if the prefill step had sampled it
        before, saved = cache.clone(), last.clone()
        batch = prepare(seqs, [1, 1, 1], BLOCK, MAX_LEN, cpu)
        hidden = model(batch.input_ids, batch.positions, batch.meta)
        expected, _ = sampler.sample(model.compute_logits(hidden), seqs)
        expected_cache = cache.clone()
        cache.copy_(before)
        tokens, _ = g.launch(seqs, [1, 1, 1])  # type: ignore[misc]
    assert tokens.tolist() == expected.tolist()
    assert [last[i].item() for i in (4, 0, 6)] == expected.tolist() and last[:8].sum() != saved[:8].sum()
    torch.testing.assert_close(cache, expected_cache, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the interpreter subprocess")
def test_pipelined_steps_give_the_general_paths_tokens(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner on the tiny checkpoint decodes three seqs (greedy, and two seeded at temperature 0.8)
    with each step launched before the last is read back, as the executor runs them: once with the
    whole-step graphs, once without. The same tokens; from the first decode on, every step runs whole."""
    from tests.runner_utils import Blocks, make_runner, new_seq, outputs
    from tests.triton_interpreter import fix_interpreter
    from worker_svc import model_runner
    from worker_svc.attention.triton_backend import TritonBackend
    from worker_svc.sampling_kernel import sample_tokens

    fix_interpreter()
    monkeypatch.setattr(model_runner, "get_backend", lambda *args: TritonBackend(num_sms=1))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the fused kernels' path
    cpu, prompts = torch.device("cpu"), [[5, 6, 7, 8, 9], [20, 30], [40, 53, 66, 79, 92, 105, 118]]

    def decode(whole: bool) -> tuple[list[list[int]], list[bool]]:
        runner = make_runner(tiny_model_dir, max_num_seqs=4)
        runner.sampler = Sampler(cpu, 0, kernel=True)
        ran: list[bool] = []
        if whole:
            graphs = DecodeGraphs(
                runner.model, sample_tokens, runner.sampler, runner.vocab_size, runner.last_tokens, 4,
                MAX_LEN // 4, 4, MAX_LEN,
            )  # fmt: skip
            launch = graphs.launch
            graphs.launch = lambda seqs, counts: ran.append(r := launch(seqs, counts)) or r  # type: ignore[method-assign]
            runner.decode_graphs = graphs
        blocks = Blocks()
        seqs = [
            new_seq(i, p, blocks, MAX_LEN, SamplingOptions(temperature=t, seed=i))
            for i, (p, t) in enumerate(zip(prompts, [0.0, 0.8, 0.8], strict=True))
        ]
        runner.run(seqs, [len(p) for p in prompts])  # the prompts, and each seq's first token
        pending = None
        for _ in range(6):
            launched = runner.launch(seqs, [1, 1, 1])
            if pending is not None:
                runner.collect(pending)
            pending = launched
        runner.collect(pending)  # type: ignore[arg-type]
        return [outputs(s) for s in seqs], [r is not None for r in ran]

    whole, ran = decode(True)
    general, _ = decode(False)
    assert whole == general and all(len(o) == 7 for o in whole)
    assert ran == [False] + [True] * 6  # the prompts' step is not a decode; every decode ran whole
