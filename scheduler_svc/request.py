"""A request as the engine tracks it, and what each streamed message carries."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from scheduler_svc.detokenizer import Detokenizer
from scheduler_svc.sequence import FinishReason
from scheduler_svc.worker_client import Sample


@dataclass
class Output:
    """What one streamed message carries."""

    index: int = 0  # which of the request's n samples
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[Sample] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    def merge(self, later: Output) -> None:
        self.token_ids += later.token_ids
        self.text += later.text
        self.logprobs += later.logprobs
        for name in ("finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "cached_prompt_tokens"):
            setattr(self, name, getattr(later, name))


@dataclass(eq=False)
class Request:
    """The frontend's side of one sample of a request: its text so far; the core holds its tokens.
    The n samples of a request share its queue."""

    request_id: str
    seq_id: int
    num_prompt_tokens: int
    detok: Detokenizer
    index: int = 0
    num_output_tokens: int = 0
    finished: bool = False  # the core has finished it, or will at the Finish sent for it
    queue: asyncio.Queue[Output | BaseException] = field(default_factory=asyncio.Queue)
    held: Output | None = None  # tokens waiting for the stream interval to fill
    arrival: float = field(default_factory=time.monotonic)
