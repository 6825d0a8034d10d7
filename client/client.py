"""Streaming clients (sync and asyncio) for the public Generation service.

    with Client("127.0.0.1:50051") as c:
        for out in c.generate("Hello", max_tokens=8, stop="\\n"):
            print(out.text, end="")

`generate`'s keyword arguments are `Sampling`'s fields (client/types.py); it yields `Output`s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from client.types import UINT32, Output, Sampling, check_range
from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pbg

Messages = Sequence[dict[str, str]]  # chat messages: {"role": ..., "content": ...}


def generate_request(
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Messages | None = None,
    request_id: str = "",
    **sampling: Any,
) -> pb.GenerateRequest:
    """A text prompt, token ids or chat messages, and Sampling's fields by name. Raises ValueError
    for what the wire cannot carry (a negative token id), TypeError for an unknown setting."""
    req = pb.GenerateRequest(request_id=request_id, sampling=Sampling(**sampling).to_proto())
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        for t in prompt:
            check_range("prompt token id", t, UINT32)
        req.token_ids.ids.extend(prompt)
    return req


class Stream:
    """One generation's messages as they arrive; `cancel()` aborts the request."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def __iter__(self) -> Iterator[Output]:
        return self

    def __next__(self) -> Output:
        return Output.from_proto(next(self.call))

    def cancel(self) -> None:
        self.call.cancel()


class Client:
    """Blocking client: `for out in Client(addr).generate("Hi", max_tokens=8): print(out.text)`."""

    def __init__(self, address: str, channel: grpc.Channel | None = None) -> None:
        self.channel = channel or grpc.insecure_channel(address)
        self.stub = pbg.GenerationStub(self.channel)

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Messages | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> Stream:
        """Streams a generation of a text prompt, token ids or chat `messages`; `sampling`: Sampling's fields."""
        return self.stream(generate_request(prompt, messages=messages, request_id=request_id, **sampling), timeout)

    def stream(self, request: pb.GenerateRequest, timeout: float | None = None) -> Stream:
        """Streams a request built (and checked) beforehand with generate_request."""
        return Stream(self.stub.Generate(request, timeout=timeout))

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)).token_ids)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client: `async for out in AsyncClient(addr).generate(...)`."""

    def __init__(self, address: str, channel: grpc.aio.Channel | None = None) -> None:
        self.channel = channel or grpc.aio.insecure_channel(address)
        self.stub = pbg.GenerationStub(self.channel)

    async def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Messages | None = None,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[Output]:
        """As Client.generate; closing the iterator early aborts the request."""
        req = generate_request(prompt, messages=messages, request_id=request_id, **sampling)
        call = self.stub.Generate(req, timeout=timeout)
        try:
            async for msg in call:
                yield Output.from_proto(msg)
        finally:
            call.cancel()

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        res = await self.stub.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens))
        return list(res.token_ids)

    async def model_info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest())

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
