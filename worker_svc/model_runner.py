"""Runs steps of the model on this rank: builds the flat batch, runs the forward pass, samples,
and keeps every rank's copy of the sequences in step: every rank ends each step with the same
sampled tokens (drawn alike from the ranks' vocabulary shards, or broadcast by rank 0)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from worker_svc.attention import get_backend
from worker_svc.batch import TableStore, prepare, step_done, to_device, to_host
from worker_svc.config import WorkerConfig
from worker_svc.cuda_graph import StepGraphs
from worker_svc.decode_graph import DecodeGraphs
from worker_svc.grammar_mask import apply_masks
from worker_svc.jit_watch import CompileWatch, GraphWatch
from worker_svc.kv_cache import allocate, block_bytes, cuda_budget
from worker_svc.layers.parallel import all_gather
from worker_svc.loader import fill_dummy, load_weights
from worker_svc.logit_stages import penalised
from worker_svc.matchers import Matchers
from worker_svc.models import MODELS
from worker_svc.models.arch import ModelArch
from worker_svc.models.regions import Regions
from worker_svc.placement import check_group, default_dtype, model_dtype, rank_device, resolve_device
from worker_svc.sampler import Logprobs, Sampler, report
from worker_svc.seq_state import Sampled, SeqState
from worker_svc.warmup import compile_prefill, warm_up, warm_up_compile


@dataclass
class Part:
    """Seqs of a step sampled together, and their results on their way to the host."""

    seqs: list[SeqState]
    tokens: torch.Tensor
    logprobs: Logprobs | None


@dataclass
class Deferred:
    """A step's constrained rows: their logits, kept for `resolve` to draw under their masks."""

    seqs: list[SeqState]
    logits: torch.Tensor
    slots: torch.Tensor


@dataclass
class Pending:
    """A launched step: its sampled parts, and the constrained rows still to sample."""

    parts: list[Part]
    deferred: Deferred | None = None
    done: torch.cuda.Event | None = None


class ModelRunner:
    def __init__(self, config: WorkerConfig, rank: int = 0, world_size: int = 1) -> None:
        config = resolve_device(config)
        check_group(config, rank, world_size)
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
        self.device = rank_device(config, rank)
        self.dtype = model_dtype(config, arch)
        self.cache_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        half = self.cache_dtype in (torch.float16, torch.bfloat16)  # flash-attn reads no fp8 cache
        backend = get_backend(config.attention_backend, config.device, config.block_size, half)
        self.model_backend = backend.name
        with default_dtype(self.dtype), self.device:
            self.model = MODELS[arch.model_type](arch, backend, self.max_model_len)
        if config.load_format == "dummy":
            fill_dummy(self.model, config.seed)
        else:
            load_weights(self.model, config.model)
        self.model.eval()
        if config.compile:
            self.model.use_regions(Regions.compiled())
        self.sampler = Sampler(self.device, config.seed)
        self.matchers = Matchers.load(config.model, self.vocab_size)  # None: structured output is off
        # Each held seq's last sampled token, on the device: up to max_num_seqs running, plus room
        # for seqs added in the step that removes others, plus one past them for the decode graphs'
        # padding rows.
        self.max_held = 2 * config.max_num_seqs
        self.last_tokens = torch.zeros(self.max_held + 1, dtype=torch.long, device=self.device)
        self._free_slots = list(range(self.max_held - 1, -1, -1))
        self.tables = TableStore(len(self.last_tokens), -(-self.max_model_len // self.block_size))
        self.graphs: StepGraphs | None = None  # captured once the cache exists
        self.decode_graphs: DecodeGraphs | None = None  # small plain decode steps, whole (decode_graph.py)
        if config.compile:
            warm_up_compile(self)
        self.num_kv_blocks = config.num_kv_blocks or self._budget_blocks()
        if self.num_kv_blocks < 1:
            raise ValueError("no memory is left for the KV cache; raise the memory budget or shrink the batch")
        self.kv_cache = allocate(self.model, self.num_kv_blocks, self.block_size, self.cache_dtype, self.device)
        if self.device.type == "cuda" and not config.enforce_eager and self.model_backend != "torch":
            max_blocks = -(-self.max_model_len // self.block_size)
            compile_prefill(self)  # for the steps too large for a graph
            tokens = min(config.prefill_graph_tokens, config.max_num_batched_tokens) if backend.captures_prefill else 0
            self.graphs = StepGraphs(
                self.model, config.max_num_seqs, tokens, max_blocks, self.max_model_len, self.device
            )
            self.graphs.capture()
            if world_size == 1 and self.sampler.kernel is not None:
                self.decode_graphs = DecodeGraphs(
                    self.model, self.sampler.kernel, self.sampler, self.vocab_size, self.last_tokens,
                    config.max_num_seqs, max_blocks, self.block_size, self.max_model_len,
                )  # fmt: skip
                self.decode_graphs.capture(self.graphs.pool)
        self.compiles = CompileWatch()  # from here on, a Triton compile stalls the requests running
        if self.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            self.compiles.install()
        self.graph_compiles = GraphWatch()  # and so does a torch.compile one
        if config.compile:
            self.graph_compiles.install()

    def run(self, seqs: list[SeqState], num_tokens: list[int]) -> list[Sampled]:
        """Computes num_tokens[i] more tokens of seqs[i] from seq.num_computed on, storing their K/V
        in the seq's blocks; every seq that reaches its last token samples one and appends it.

        Returns the samples in batch order on rank 0, [] on the other ranks, which take part in the
        collectives and append the same tokens (see _sample).
        """
        return self.collect(self.launch(seqs, num_tokens))

    def launch(self, seqs: list[SeqState], num_tokens: list[int]) -> Pending:
        """Queues a step on the device and returns without waiting for it. The sampled tokens stay
        on the device (a later step's decode reads them there) until `collect` brings them over.
        Constrained seqs (with a matcher) are left to `resolve`: their masks need the tokens of the
        step before on the host."""
        if not seqs:
            return Pending([])
        for seq in seqs:
            if seq.slot < 0:
                if not self._free_slots:
                    raise ValueError(f"more than {self.max_held} sequences held at once")
                seq.slot = self._free_slots.pop()
        if self.decode_graphs is not None and (fast := self.decode_graphs.launch(seqs, num_tokens)) is not None:
            tokens, done = fast
            return Pending([Part(seqs, tokens, None)], done=done)
        batch = prepare(seqs, num_tokens, self.block_size, self.max_model_len, self.device, self.tables)
        with torch.inference_mode():
            if batch.fill_rows.numel():
                batch.input_ids[batch.fill_rows] = self.last_tokens[batch.fill_slots]
            graphs = self.graphs
            shape = graphs.pick(batch) if graphs is not None else None
            if graphs is not None and shape is not None:
                hidden = graphs.run(batch, shape)
            else:
                hidden = self.model(batch.input_ids, batch.positions, batch.meta)
            for seq, n in zip(seqs, num_tokens, strict=True):
                seq.num_computed += n
            if not batch.samplers:
                return Pending([])
            sampling = [seqs[i] for i in batch.samplers]
            logits = self.model.compute_logits(hidden[batch.sample_rows])
            later = [i for i, s in enumerate(sampling) if s.matcher is not None]
            if not later:
                return self._launched(Pending([self._draw(logits, sampling, batch.sample_slots)]))
            now = [i for i, s in enumerate(sampling) if s.matcher is None]
            # Indexes through pinned memory: a blocking copy would wait for the step just queued.
            now_at, later_at = to_device([np.array(now, dtype=np.int64), np.array(later, dtype=np.int64)], self.device)
            parts = [self._draw(logits[now_at], [sampling[i] for i in now], batch.sample_slots[now_at])] if now else []
            deferred = Deferred([sampling[i] for i in later], logits[later_at], batch.sample_slots[later_at])
            return Pending(parts, deferred)

    def resolve(self, pending: Pending) -> None:
        """Draws a launched step's constrained rows under their grammars' masks. Every step before it
        must be collected (its tokens accepted by the matchers); the step can then be collected."""
        deferred, pending.deferred = pending.deferred, None
        assert deferred is not None and self.matchers is not None, "resolve a step with constrained rows"
        words = self.matchers.masks(deferred.seqs, pinned=self.device.type == "cuda")
        with torch.inference_mode():
            pending.parts.append(self._draw(deferred.logits, deferred.seqs, deferred.slots, words))
        self._launched(pending)

    def _draw(
        self, logits: torch.Tensor, seqs: list[SeqState], slots: torch.Tensor, masks: torch.Tensor | None = None
    ) -> Part:
        tokens, logprobs = self._sample(logits, seqs, masks)
        self.last_tokens[slots] = tokens
        for seq in seqs:
            seq.held = seq.num_tokens
            seq.num_pending += 1
        return Part(seqs, to_host(tokens), logprobs.to_host() if logprobs is not None else None)

    def _launched(self, pending: Pending) -> Pending:
        if self.device.type == "cuda":
            pending.done = step_done()
        return pending

    def _sample(
        self, logits: torch.Tensor, seqs: list[SeqState], masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, Logprobs | None]:
        """Tokens for the rows `logits` (this rank's vocabulary shard) of seqs, the same on every rank;
        logprobs on rank 0."""
        if masks is not None:  # every rank masks its own vocabulary shard, before either draw
            apply_masks(logits, masks, self.model.lm_head.start)
        if self.world_size == 1:
            return self.sampler.sample(logits, seqs)
        head = self.model.lm_head
        if self.sampler.one_pass(seqs, self.vocab_size):
            # Each rank draws over its own slice of the vocabulary and the ranks swap their best
            # candidates: no rank gathers the logits (77 MB from each rank at batch 256), and
            # every rank has the tokens without a broadcast.
            tokens = self.sampler.sample_shard(logits, seqs, head.start, head.valid, self.world_size, all_gather)
            return tokens, None
        full = head.gather(logits)
        if full is not None:
            tokens, logprobs = self.sampler.sample(full, seqs)
        else:
            tokens, logprobs = torch.empty(len(seqs), dtype=torch.long, device=self.device), None
        dist.broadcast(tokens, src=0)  # every rank feeds rank 0's choice to its next step
        return tokens, logprobs

    def collect(self, pending: Pending) -> list[Sampled]:
        """Waits for a launched step and appends its sampled tokens to their seqs (every rank)."""
        if pending.deferred is not None:
            self.resolve(pending)
        if pending.done is not None:
            pending.done.synchronize()
        samples: list[Sampled] = []
        for part in pending.parts:
            token_ids = part.tokens.tolist()
            for seq, token_id in zip(part.seqs, token_ids, strict=True):
                seq.token_ids.append(token_id)
                seq.num_pending -= 1
                if seq.matcher is not None:
                    self.matchers.accept(seq, token_id)  # type: ignore[union-attr]
            if self.rank == 0:
                samples += report(part.seqs, token_ids, part.logprobs)
        return samples

    def bind_thread(self) -> None:
        """Makes this runner's GPU the calling thread's current device. CUDA keeps the current
        device per thread, and Triton launches on it: a step run from a server thread would
        otherwise launch on GPU 0 with another GPU's tensors (seen at TP=2 on rank 1)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def needs_history(self, seqs: list[SeqState]) -> bool:
        """Whether launching these needs every earlier token's value on the host (penalties do)."""
        return any(s.num_pending and penalised(s.sampling) for s in seqs)

    def release(self, seq: SeqState) -> None:
        """Gives a finished or preempted seq's slot back."""
        if seq.slot >= 0:
            self.tables.clear(seq)
            self._free_slots.append(seq.slot)
            seq.slot = seq.held = -1

    def _budget_blocks(self) -> int:
        per_block = block_bytes(self.model, self.block_size, self.cache_dtype)
        if self.device.type == "cpu":
            return int(self.config.kv_cache_memory_gb * 2**30) // per_block
        torch.cuda.reset_peak_memory_stats(self.device)
        warm_up(self)
        return cuda_budget(self.device, self.config.gpu_memory_utilization) // per_block
