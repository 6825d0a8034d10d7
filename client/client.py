"""Streaming clients (sync and asyncio) for the public Generation service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from proto import generate_pb2 as pb
from proto import generate_pb2_grpc as pbg


def sampling_params(**kwargs: object) -> pb.SamplingParams:
    """Builds SamplingParams from keyword arguments; None values stay unset (server defaults)."""
    return pb.SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def generate_request(
    prompt: str | Sequence[int] | None = None,
    *,
    messages: Sequence[dict[str, str]] | None = None,
    request_id: str = "",
    **sampling: object,
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=request_id, sampling=sampling_params(**sampling))
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


class Client:
    """Blocking client: `for msg in Client(addr).generate("Hi", max_tokens=8): print(msg.text)`."""

    def __init__(self, address: str, channel: grpc.Channel | None = None) -> None:
        self.channel = channel or grpc.insecure_channel(address)
        self.stub = pbg.GenerationStub(self.channel)

    def generate(self, prompt: str | Sequence[int] | None = None, **kwargs: object) -> Iterator[pb.GenerateResponse]:
        timeout = kwargs.pop("timeout", None)
        return self.stub.Generate(generate_request(prompt, **kwargs), timeout=timeout)

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
    """asyncio client: `async for msg in AsyncClient(addr).generate(...)`."""

    def __init__(self, address: str, channel: grpc.aio.Channel | None = None) -> None:
        self.channel = channel or grpc.aio.insecure_channel(address)
        self.stub = pbg.GenerationStub(self.channel)

    async def generate(
        self, prompt: str | Sequence[int] | None = None, **kwargs: object
    ) -> AsyncIterator[pb.GenerateResponse]:
        timeout = kwargs.pop("timeout", None)
        call = self.stub.Generate(generate_request(prompt, **kwargs), timeout=timeout)
        try:
            async for msg in call:
                yield msg
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
