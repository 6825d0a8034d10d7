"""Exceptions that cross the servicer edge; the interceptor maps each to one gRPC status."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The client sent something we cannot serve (maps to INVALID_ARGUMENT)."""


class Overloaded(RuntimeError):
    """Too many requests queued (maps to RESOURCE_EXHAUSTED)."""


class WorkerUnavailable(RuntimeError):
    """A worker died or cannot be reached (maps to UNAVAILABLE)."""
