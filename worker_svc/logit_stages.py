"""The torch stages that change a row's logits before the draw: logit bias, repetition, presence
and frequency penalties, min_tokens masking, and (on temperature-scaled logits) top-k, top-p and
min-p. Each touches only the rows whose seqs use it, and the sampler skips a stage that no seq of
the batch uses; rows that need none go to the one-pass sampling kernel as they are."""

from __future__ import annotations

import torch

from worker_svc.batch import upload
from worker_svc.seq_state import SamplingOptions, SeqState


def penalised(o: SamplingOptions) -> bool:
    return o.repetition_penalty != 1.0 or o.presence_penalty != 0.0 or o.frequency_penalty != 0.0


def min_tokens_active(seq: SeqState) -> bool:
    return seq.num_output < seq.sampling.min_tokens and bool(seq.sampling.min_tokens_banned_ids)


def filters(o: SamplingOptions, vocab: int) -> bool:
    return 0 < o.top_k < vocab or o.top_p < 1 or o.min_p > 0


def apply_logit_bias(logits: torch.Tensor, seqs: list[SeqState]) -> None:
    """In place: adds each seq's logit_bias to its row."""
    ids = [s.sampling.logit_bias_ids for s in seqs]
    if any(ids):
        values = [v for s in seqs for v in s.sampling.logit_bias_values]
        logits.index_put_(_scatter_index(ids, logits.device), upload(values, logits.device), accumulate=True)


def apply_penalties(logits: torch.Tensor, seqs: list[SeqState]) -> None:
    """In place. Repetition penalty over prompt and output tokens (positive logits divided, negative
    multiplied); presence and frequency penalties over output tokens only."""
    rows = [i for i, s in enumerate(seqs) if penalised(s.sampling)]
    if not rows:
        return
    picked = [seqs[i] for i in rows]
    device, vocab = logits.device, logits.size(1)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    seen[_scatter_index([s.token_ids for s in picked], device)] = True
    counts = torch.zeros(len(rows), vocab, device=device)
    out_index = _scatter_index([s.token_ids[s.num_prompt_tokens :] for s in picked], device)
    counts.index_put_(out_index, torch.ones(out_index[0].numel(), device=device), accumulate=True)

    def per_row(values: list[float]) -> torch.Tensor:
        return upload(values, device).unsqueeze(1)

    rep = torch.where(seen, per_row([s.sampling.repetition_penalty for s in picked]), 1.0)
    sub = logits[rows]
    sub = torch.where(sub > 0, sub / rep, sub * rep)
    sub -= per_row([s.sampling.frequency_penalty for s in picked]) * counts
    sub -= per_row([s.sampling.presence_penalty for s in picked]) * (counts > 0)
    logits[rows] = sub


def apply_min_tokens(logits: torch.Tensor, seqs: list[SeqState]) -> None:
    """In place: bans min_tokens_banned_ids (EOS, stop ids) until a seq has min_tokens outputs."""
    banned = [s.sampling.min_tokens_banned_ids if min_tokens_active(s) else [] for s in seqs]
    if any(banned):
        logits[_scatter_index(banned, logits.device)] = float("-inf")


def apply_filters(logits: torch.Tensor, opts: list[SamplingOptions], device: torch.device) -> torch.Tensor:
    """Top-k, top-p, then min-p on temperature-scaled logits; rows without them come out unchanged."""
    vocab = logits.size(1)
    if any(0 < o.top_k < vocab or o.top_p < 1 for o in opts):
        top_k = upload([o.top_k if 0 < o.top_k < vocab else vocab for o in opts], device)
        top_p = upload([o.top_p for o in opts], device)
        logits = apply_top_k_top_p(logits, top_k, top_p)
    if any(o.min_p > 0 for o in opts):
        logits = apply_min_p(logits, upload([o.min_p for o in opts], device))
    return logits


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps each row's top_k best tokens, then the fewest of those whose probability reaches top_p."""
    ordered, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.size(1), device=logits.device)
    drop = ranks.unsqueeze(0) >= top_k.unsqueeze(1)
    probs = ordered.masked_fill(drop, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better tokens: the best one always stays
    # Rows with top_p = 1 are left alone: rounding could push `before` to 1 near the tail.
    drop |= (before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    return torch.empty_like(logits).scatter_(-1, order, ordered.masked_fill(drop, float("-inf")))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens less likely than min_p times the row's most likely token."""
    probs = logits.softmax(dim=-1)
    floor = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < floor, float("-inf"))


def _scatter_index(ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, id) index tensors addressing ids[r] in row r of a [len(ids), vocab] tensor."""
    rows = [r for r, row in enumerate(ids) for _ in row]
    flat = [t for row in ids for t in row]
    return upload(rows, device, torch.long), upload(flat, device, torch.long)
