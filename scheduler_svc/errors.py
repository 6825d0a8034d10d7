"""Exceptions that cross the servicer edge; the interceptor maps each to one gRPC status."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The client sent something we cannot serve (maps to INVALID_ARGUMENT)."""


class Unsupported(ValueError):
    """A feature this engine does not serve, e.g. multimodal inputs (maps to UNIMPLEMENTED)."""


class Overloaded(RuntimeError):
    """Too many requests queued (maps to RESOURCE_EXHAUSTED)."""


class WorkerUnavailable(RuntimeError):
    """A worker died or cannot be reached (maps to UNAVAILABLE)."""


class ShuttingDown(RuntimeError):
    """The server is draining or did not finish a request before its shutdown timeout (maps to UNAVAILABLE,
    which clients treat as: retry on another replica)."""


class ReplayExpired(RuntimeError):
    """A KV-event subscriber asked to resume from a batch no longer kept (maps to OUT_OF_RANGE)."""


class SubscriberLagged(RuntimeError):
    """A KV-event subscriber fell too far behind (maps to DATA_LOSS); it resubscribes from 0 for a snapshot."""
