"""What a client sends and gets back, as plain typed values: the protobufs stay inside the client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from proto import generate_pb2 as pb

UINT32 = (0, 2**32 - 1)
INT32 = (-(2**31), 2**31 - 1)
UINT64 = (0, 2**64 - 1)
# What the wire can carry; the server checks the rest and answers INVALID_ARGUMENT.
_RANGES = {"max_tokens": UINT32, "top_k": INT32, "seed": UINT64, "min_tokens": UINT32, "logprobs": UINT32}
FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


def check_range(name: str, value: int, bounds: tuple[int, int]) -> None:
    """Raises ValueError, worded as the server words its own checks."""
    lo, hi = bounds
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings. None (or empty) leaves the server's default, in brackets."""

    max_tokens: int | None = None  # tokens to generate at most [16]
    temperature: float | None = None  # 0: greedy [1.0]
    top_p: float | None = None  # nucleus share, in (0, 1] [1.0]
    top_k: int | None = None  # best k tokens only; 0 or -1: all [0]
    min_p: float | None = None  # drop tokens below min_p times the best one's probability [0.0]
    seed: int | None = None  # makes sampling reproducible [none]
    repetition_penalty: float | None = None  # > 1 discourages tokens already seen [1.0]
    presence_penalty: float | None = None  # in [-2, 2] [0.0]
    frequency_penalty: float | None = None  # in [-2, 2] [0.0]
    stop: str | Sequence[str] = ()  # stop strings, left out of the text; a str is one stop string
    stop_token_ids: Sequence[int] = ()  # stop tokens, kept in token_ids
    min_tokens: int | None = None  # no EOS or stop token before this many [0]
    ignore_eos: bool = False  # generate max_tokens whatever the model says
    logprobs: int | None = None  # top logprobs returned per token [0: none]

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name, bounds in _RANGES.items():
            if (value := getattr(self, name)) is not None:
                check_range(f"sampling.{name}", value, bounds)
        for t in self.stop_token_ids:
            check_range("sampling.stop_token_ids", t, UINT32)

    def to_proto(self) -> pb.SamplingParams:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return pb.SamplingParams(**{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class Logprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the most likely tokens' logprobs, best first


# Not frozen: a client streaming hundreds of requests builds one per message, and a frozen
# dataclass's __init__ costs several times a plain one's.
@dataclass(slots=True)
class Output:
    """One streamed message: the tokens and text new since the last one."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[Logprob]  # one per new token, when asked
    finish_reason: str | None  # "stop", "length" or "abort" on the last message; None before
    usage: Usage | None  # on the last message
    stop_reason: str  # the stop string or stop token id that ended it, if any

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> Output:
        usage = msg.usage
        return cls(
            request_id=msg.request_id,
            token_ids=list(msg.token_ids),
            text=msg.text,
            logprobs=[Logprob(lp.token_id, lp.logprob, {t.token_id: t.logprob for t in lp.top}) for lp in msg.logprobs],
            finish_reason=FINISH_REASONS[msg.finish_reason],
            usage=Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens)
            if msg.HasField("usage")
            else None,
            stop_reason=msg.stop_reason,
        )
