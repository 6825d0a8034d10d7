"""The one error boundary: maps exceptions raised by the public handlers (nanovllm.v1 Generation and
vllm.grpc.engine.VllmEngine) to gRPC status codes.

Only the public APIs are wrapped: health and reflection come from grpcio and set their own statuses.
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
                    return await inner_uu(request, context)
                except Exception as e:
                    await _abort(context, e)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except Exception as e:
                    await _abort(context, e)

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
