"""Start-up steps that make a model runner's first real steps cost what later ones do: the peak
activations measured before the KV cache is sized, and every kernel variant compiled before a
request can wait on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker_svc.seq_state import SamplingOptions, SeqState

if TYPE_CHECKING:
    from worker_svc.model_runner import ModelRunner


def warm_up(runner: ModelRunner) -> None:
    """One step as large as the scheduler may send: max_num_batched_tokens tokens spread over
    max_num_seqs seqs, all sampling, so activations and logits reach their peak. It runs
    before the cache exists: every seq starts from scratch, so attention needs no cache."""
    cfg = runner.config
    tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * runner.max_model_len)
    count = min(cfg.max_num_seqs, tokens)
    lengths = [tokens // count + (i < tokens % count) for i in range(count)]
    seqs = [
        SeqState(i, [0] * n, n, 0, [0] * -(-n // runner.block_size), SamplingOptions()) for i, n in enumerate(lengths)
    ]
    runner.run(seqs, lengths)
    for seq in seqs:
        runner.release(seq)


def warm_up_compile(runner: ModelRunner) -> None:
    """Steps of 1, 2 and 3 tokens, before the cache exists, so torch.compile compiles every region
    now: once for one token (a size dynamo always specialises on) and, having seen the count vary,
    once for any other count. Inductor keeps what it built in its cache on disk
    (TORCHINDUCTOR_CACHE_DIR, else a folder in the temp dir): a restart only traces again."""
    for n in (1, 2, 3):
        seq = SeqState(0, [0] * n, n, 0, [0] * -(-n // runner.block_size), SamplingOptions())
        runner.run([seq], [n])
        runner.release(seq)


def compile_prefill(runner: ModelRunner) -> None:
    """Runs one of each prefill shape the kernels specialise on (from scratch or after a cached
    prefix, each with 16-, 64- and 128-row query tiles; decode rows mixed with a chunk; a single
    row, which layers/gemv.py's kernels take), so
    their JIT compilation happens now and not in some request's time to first token. Uses the
    first blocks of the still unused cache. (The from-scratch 64-row tile ran in warm_up.)"""
    blocks = list(range(min(runner.num_kv_blocks, -(-700 // runner.block_size))))
    need = -(-330 // runner.block_size)
    if len(blocks) <= 2 * need:
        return  # a cache this small is a test setup, not a server worth warming
    a = SeqState(0, [0] * 330, 300, 0, blocks[:need], SamplingOptions())
    b = SeqState(1, [0] * 330, 300, 0, blocks[need : 2 * need], SamplingOptions())
    c = SeqState(2, [0] * 10, 10, 0, blocks[2 * need : 2 * need + 1], SamplingOptions())
    plan = ([a], [200]), ([c], [10]), ([a], [100]), ([a, b], [1, 40]), ([a, b], [1, 200]), ([b], [16]), ([a], [1])
    for seqs, counts in plan:
        runner.run(seqs, counts)
    for seq in (a, b, c):
        runner.release(seq)
