"""The one error boundary: maps exceptions raised by the public handlers (nanovllm.v1 Generation and
vllm.grpc.engine.VllmEngine) to gRPC status codes.

Only the public APIs are wrapped: health and reflection come from grpcio and set their own statuses.
grpc parses a request before any handler runs, and logs a traceback and answers UNKNOWN when the
bytes do not parse; so the wrapped methods parse with a deserializer that never raises and hands
the handler a `Malformed` instead, which becomes INVALID_ARGUMENT here like any bad input.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from proto import generate_pb2 as pb
from scheduler_svc.errors import (
    InvalidRequest,
    Overloaded,
    ReplayExpired,
    ShuttingDown,
    SubscriberLagged,
    Unsupported,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)

STATUS = {
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ReplayExpired: grpc.StatusCode.OUT_OF_RANGE,
    SubscriberLagged: grpc.StatusCode.DATA_LOSS,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WorkerUnavailable: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}
SERVICES = ((pb.DESCRIPTOR, "Generation"), (vpb.DESCRIPTOR, "VllmEngine"))
PREFIXES = tuple(f"/{d.services_by_name[name].full_name}/" for d, name in SERVICES)


class Malformed:
    """What a request that did not parse becomes: why, for the handler to raise."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # protobuf's DecodeError: truncated, wrong wire types, a string not UTF-8
            return Malformed(f"the request does not parse: {e}")

    return parse


def _check(request: Any) -> None:
    if isinstance(request, Malformed):
        raise InvalidRequest(request.why)


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code = next((c for t, c in STATUS.items() if isinstance(exc, t)), None)
    if code is None:
        log.exception("internal error", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc!r}")
    await context.abort(code, str(exc))


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(PREFIXES):
            return handler
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    _check(request)
                    return await inner_uu(request, context)
                except Exception as e:
                    await _abort(context, e)

            return grpc.unary_unary_rpc_method_handler(
                unary, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    _check(request)
                    async for item in inner_us(request, context):
                        yield item
                except Exception as e:
                    await _abort(context, e)

            return grpc.unary_stream_rpc_method_handler(
                stream, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        return handler
