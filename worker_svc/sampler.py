"""Turns the logits of the sequences that sample this step into tokens, with per-seq settings.

Order: logit bias, repetition penalty, presence/frequency penalties, min_tokens masking,
temperature (0: greedy), top-k, top-p, min-p (the stages of logit_stages.py), then one random draw
per token. Every stage is skipped when no seq in the batch uses it, since this runs every decode step.

On CUDA the draw is the one-pass Triton kernel of sampling_kernel.py; when no seq needs a stage
before it, the kernel reads the model's logits as they are, in their own dtype. Elsewhere (the CPU)
the draw is an exponential race in torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from worker_svc.batch import to_host, upload
from worker_svc.logit_stages import (
    apply_filters,
    apply_logit_bias,
    apply_min_tokens,
    apply_penalties,
    filters,
    min_tokens_active,
    penalised,
)
from worker_svc.seq_state import Sampled, SamplingOptions, SeqState

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1  # row seeds travel as int64
_UNFILTERED = SamplingOptions()  # no top-k, top-p or min-p
_UNSEEDED = 0x5EED  # keeps an unseeded seq's stream apart from one seeded with the same number


@dataclass
class Logprobs:
    """Top logprobs of the rows that asked, still where they were computed."""

    rows: list[int]
    chosen: torch.Tensor  # [R]
    top_values: torch.Tensor  # [R, n]
    top_ids: torch.Tensor  # [R, n]

    def to_host(self) -> Logprobs:
        return Logprobs(self.rows, to_host(self.chosen), to_host(self.top_values), to_host(self.top_ids))


class Sampler:
    def __init__(self, device: torch.device, seed: int, kernel: bool | None = None) -> None:
        """kernel: draw with the Triton kernel; by default on CUDA when triton is installed. Tests
        force it for CPU tensors under TRITON_INTERPRET=1."""
        self.device = device
        # Shared by the unseeded seqs: their draws may depend on the rest of the batch, which is
        # fine since only seeded seqs promise reproducible tokens.
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.seed = seed  # the kernel path's unseeded rows derive their noise from it
        if kernel is None:
            kernel = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.kernel: Callable[..., torch.Tensor] | None = None
        self.shard_kernel: Callable[..., torch.Tensor] | None = None
        if kernel:
            from worker_svc.sampling_kernel import sample_shard, sample_tokens  # imports triton

            self.kernel, self.shard_kernel = sample_tokens, sample_shard

    def sample(self, logits: torch.Tensor, seqs: list[SeqState]) -> tuple[torch.Tensor, Logprobs | None]:
        """Samples one token per row of logits [S, vocab] (any float dtype); row i belongs to seqs[i].

        Returns the tokens and the requested logprobs on the device, without waiting for them."""
        tokens = self._sample_torch(logits.float(), seqs) if self.kernel is None else self._sample_kernel(logits, seqs)
        return tokens, _logprobs(logits, tokens, seqs)

    def one_pass(self, seqs: list[SeqState], vocab: int) -> bool:
        """Whether the one-pass kernel alone draws these seqs' tokens from the model's logits, with
        no stage that needs a whole row (penalties, min_tokens, top-k/top-p/min-p, logprobs): as
        sample_shard does, and as the decode graphs do."""
        return self.shard_kernel is not None and all(_plain(s, vocab) and not s.sampling.logprobs for s in seqs)

    def sample_shard(
        self,
        logits: torch.Tensor,
        seqs: list[SeqState],
        offset: int,
        vocab: int,
        ranks: int,
        all_gather: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The tokens `sample` would draw from the whole rows, from this rank's vocab shard: logits
        [S, W] hold entries [offset, offset + vocab). Every rank calls it with the same seqs and gets
        the same tokens (see sampling_kernel.sample_shard). Only for seqs that are `one_pass`."""
        assert self.shard_kernel is not None
        seeds_dev, (temps,) = _upload(self.row_seeds(seqs), [[s.sampling.temperature for s in seqs]], self.device)
        return self.shard_kernel(logits, temps, seeds_dev, offset, vocab, ranks, all_gather)

    def _sample_kernel(self, logits: torch.Tensor, seqs: list[SeqState]) -> torch.Tensor:
        assert self.kernel is not None
        opts = [s.sampling for s in seqs]
        seeds = self.row_seeds(seqs)
        vocab = logits.size(1)
        if all(_plain(s, vocab) for s in seqs):
            seeds_dev, (temps,) = _upload(seeds, [[o.temperature for o in opts]], self.device)
            return self.kernel(logits, temps, seeds_dev)
        filtered = [o.temperature > 0 and filters(o, vocab) for o in opts]
        work = logits.to(torch.float32, copy=True)  # keep the raw logits intact for the logprobs
        apply_logit_bias(work, seqs)
        apply_penalties(work, seqs)
        apply_min_tokens(work, seqs)
        # Rows with top-k/top-p/min-p are filtered at their temperature, then drawn at T = 1. The
        # others keep the logits and temperature the fast path would give the kernel, bit for bit,
        # so a seeded seq's token does not depend on what its neighbours need.
        pairs = list(zip(opts, filtered, strict=True))
        temps = [0.0 if o.temperature == 0 else 1.0 if f else o.temperature for o, f in pairs]
        scales = [o.temperature if f else 1.0 for o, f in pairs]
        seeds_dev, (temps_dev, scales_dev) = _upload(seeds, [temps, scales], self.device)
        if any(filtered):
            work = work / scales_dev.unsqueeze(1)
            work = apply_filters(work, [o if f else _UNFILTERED for o, f in pairs], self.device)
        return self.kernel(work, temps_dev, seeds_dev)

    def row_seeds(self, seqs: list[SeqState]) -> np.ndarray:
        """int64 seeds, one a row: _mix(key, output index), the key being the seq's seed (unseeded:
        from the worker's seed and the seq's id). A row's noise thus depends on nothing else in the
        batch, comes out the same after preemption recomputes it, and agrees on every
        tensor-parallel rank without any state to keep in step. Vectorised, as it runs for every
        row of every step; greedy rows get one too and ignore it."""
        bases = np.fromiter((self._noise_base(s) for s in seqs), np.uint64, len(seqs))
        outputs = np.fromiter((s.num_output for s in seqs), np.uint64, len(seqs))
        return (_splitmix64_array(bases + outputs) & np.uint64(_MASK63)).astype(np.int64)

    def _noise_base(self, seq: SeqState) -> int:
        """splitmix64 of the seq's key: the per-seq half of _mix, computed once per seq."""
        if seq.noise_base is None:
            o = seq.sampling
            key = o.seed if o.seed is not None else _mix(self.seed, seq.seq_id) ^ _UNSEEDED
            seq.noise_base = _splitmix64(key & _MASK64)
        return seq.noise_base

    def _sample_torch(self, logits: torch.Tensor, seqs: list[SeqState]) -> torch.Tensor:
        opts = [s.sampling for s in seqs]
        work = logits
        if any(penalised(o) or o.logit_bias_ids for o in opts) or any(min_tokens_active(s) for s in seqs):
            work = logits.clone()  # keep the raw logits intact for the logprobs
            apply_logit_bias(work, seqs)
            apply_penalties(work, seqs)
            apply_min_tokens(work, seqs)
        tokens = work.argmax(dim=-1)
        if any(o.temperature > 0 for o in opts):
            if all(o.temperature > 0 for o in opts):
                tokens = self._draw(work, seqs)
            else:
                greedy = upload([o.temperature == 0 for o in opts], self.device)
                tokens = torch.where(greedy, tokens, self._draw(work, seqs))
        return tokens

    def _draw(self, logits: torch.Tensor, seqs: list[SeqState]) -> torch.Tensor:
        opts = [s.sampling for s in seqs]
        temps = upload([o.temperature or 1.0 for o in opts], self.device)
        logits = apply_filters(logits / temps.unsqueeze(1), opts, self.device)
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i, from
        # one draw per vocab entry. A seq's draw depends only on its own noise row, so a seeded seq
        # gets a row from its own generator, keyed by (seed, output index): the same token whatever
        # else is in the batch, and again after preemption recomputes it.
        noise = torch.empty_like(probs)
        if any(o.seed is None for o in opts):
            noise.exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.sampling.seed is not None and seq.sampling.temperature > 0:
                gen = torch.Generator(device=self.device).manual_seed(_mix(seq.sampling.seed, seq.num_output))
                noise[i].exponential_(generator=gen)
        # E can round to 0; a floor keeps zero-probability tokens at 0 instead of 0/0.
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def _plain(seq: SeqState, vocab: int) -> bool:
    """Whether the seq's row goes to the one-pass kernel as the model's logits, with no torch stage."""
    o = seq.sampling
    return not ((o.temperature > 0 and filters(o, vocab)) or penalised(o) or min_tokens_active(seq) or o.logit_bias_ids)


def _upload(
    seeds: np.ndarray, rows: list[list[float]], device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """int64 seeds and float32 rows on the device through one host buffer and one copy, pinned and
    non-blocking on CUDA (see to_device in batch.py). Each part starts 16-byte aligned, as Triton
    specialises kernels on pointer alignment: the batch size must not pick a new compilation."""
    width = -(-len(seeds) // 4) * 4
    host = torch.zeros(width + len(rows) * width // 2, dtype=torch.int64, pin_memory=device.type == "cuda")
    flat = host.numpy()
    flat[: len(seeds)] = seeds
    flat[width:].view(np.float32).reshape(len(rows), width)[:, : len(seeds)] = rows
    dev = host.to(device, non_blocking=True)
    floats = dev[width:].view(torch.float32).view(len(rows), width)[:, : len(seeds)]
    return dev[: len(seeds)], list(floats.unbind(0))


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, seqs: list[SeqState]) -> Logprobs | None:
    rows = [i for i, s in enumerate(seqs) if s.sampling.logprobs > 0]
    if not rows:
        return None
    # From the raw logits, before penalties and temperature: what vLLM returns by default, and
    # what describes the model rather than the sampling settings.
    index = upload(rows, raw.device, torch.long)
    logprobs = raw[index].float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1)
    most = min(max(seqs[i].sampling.logprobs for i in rows), logprobs.size(1))
    top_values, top_ids = logprobs.topk(most, dim=-1)
    return Logprobs(rows, chosen, top_values, top_ids)


def report(seqs: list[SeqState], token_ids: list[int], logprobs: Logprobs | None) -> list[Sampled]:
    """Host-side samples, once the tokens (and logprobs) have reached the host."""
    out = [Sampled(s.seq_id, t) for s, t in zip(seqs, token_ids, strict=True)]
    if logprobs is None:
        return out
    chosen, values, ids = logprobs.chosen.tolist(), logprobs.top_values.tolist(), logprobs.top_ids.tolist()
    for j, i in enumerate(logprobs.rows):
        n = seqs[i].sampling.logprobs
        out[i].logprob, out[i].top_ids, out[i].top_logprobs = chosen[j], ids[j][:n], values[j][:n]
    return out


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """_splitmix64 of each uint64 (numpy's uint64 arithmetic wraps, as the masks do there)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix(seed: int, index: int) -> int:
    """A generator seed for draw `index` of a seq seeded `seed`: nearby pairs get unrelated streams."""
    return _splitmix64((_splitmix64(seed & _MASK64) + index) & _MASK64)
