"""The messages between the scheduler's frontend and its engine core, one type per event.

Frontend -> core: Add (a tokenized, validated request), Finish (aborted by its client, or ended by
a stop string the frontend found), Flush (empty the prefix cache). Core -> frontend: Started (the
model's limits, once the workers are ready), StepOutputs (each step's sampled tokens, the
scheduler's counts and the prefix cache's events), Flushed, Rejected (a request whose constraint
does not compile), WorkersLost, WorkersBack and RecoveryFailed (a rank was lost; the group is
back; it stayed away past the recovery timeout), Dead (why the core stopped). In one process they
are plain calls; core_process.py pickles them over a socket.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_svc.kv_events import KvEvent
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.sequence import FinishReason


@dataclass(frozen=True)
class CoreInfo:
    """What the frontend validates requests against, and reports in GetModelInfo."""

    max_model_len: int
    vocab_size: int
    block_size: int
    num_blocks: int
    world_size: int


@dataclass(frozen=True)
class CoreStats:
    """The scheduler's state after a step, for metrics, status lines and admission control."""

    num_added: int  # Add messages applied so far: the frontend counts the ones not yet seen here
    waiting: int
    running: int
    blocks_free: int
    prefix_queries: int
    prefix_hits: int
    preemptions: int

    @property
    def hit_rate(self) -> float:
        """Share of full prompt blocks served from the prefix cache since start."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


# ---- messages: frontend -> core ----


@dataclass(frozen=True)
class Add:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    leader: int | None = None  # the first sample's seq_id, for the other samples of an n > 1 request


@dataclass(frozen=True)
class Finish:
    """Ends a sequence the frontend is done with: aborted by its client, or a stop string found."""

    seq_id: int
    reason: FinishReason


@dataclass(frozen=True)
class Flush:
    """Empties the prefix cache if no block is in use; answered with Flushed."""


# ---- messages: core -> frontend ----


@dataclass(frozen=True)
class Started:
    info: CoreInfo


@dataclass(frozen=True)
class Sample:
    """A sampled token and, when the request asked, its logprob and the top candidates'."""

    token_id: int
    logprob: float | None = None
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


# One sampled token: (seq_id, token_id, finish_reason or None, cached prompt tokens, logprobs or None).
Update = tuple[int, int, FinishReason | None, int, Sample | None]


@dataclass(frozen=True)
class StepOutputs:
    updates: list[Update]
    step_seconds: float  # the step's worker time: from its send, or the previous result if later (0: no step)
    stats: CoreStats
    kv: tuple[KvEvent, ...] = ()  # what the prefix cache stored and evicted since the last StepOutputs
    queued: tuple[float, ...] = ()  # seconds from Add to first scheduled, of the sequences first scheduled since


@dataclass(frozen=True)
class Flushed:
    ok: bool


@dataclass(frozen=True)
class Rejected:
    """A request the core did not queue: its constraint does not compile, or no worker can apply one."""

    seq_id: int
    why: str


@dataclass(frozen=True)
class WorkersLost:
    """A rank failed: the core keeps every request and reconnects; nothing is streamed meanwhile."""

    why: str


@dataclass(frozen=True)
class WorkersBack:
    """Every rank is back; the requests held are resumed by recompute from their known tokens."""

    resumed: int
    recomputed: int  # their known tokens, whose KV the lost workers held
    seconds: float  # since the loss


@dataclass(frozen=True)
class RecoveryFailed:
    """The group stayed away past the recovery timeout: the core dropped every request it held (the
    frontend fails them with UNAVAILABLE) and keeps reconnecting."""

    why: str


@dataclass(frozen=True)
class Dead:
    why: str


Event = Started | StepOutputs | Flushed | Rejected | WorkersLost | WorkersBack | RecoveryFailed | Dead
