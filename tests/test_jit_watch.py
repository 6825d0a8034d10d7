"""The serving-time compile report: what a stall in the logs will say."""

from __future__ import annotations

import logging

import pytest

from worker_svc.jit_watch import CompileWatch


def test_logs_each_compile_with_its_signature(caplog: pytest.LogCaptureFixture) -> None:
    watch = CompileWatch()
    with caplog.at_level(logging.WARNING, logger="worker_svc.jit_watch"):
        assert watch.before(key=("k", 1), repr="ignored") is False  # compile as usual
        watch.after(key=("k", 1), repr="prefill_kernel(stride_bt: i32 (D))")
    assert watch.count == 1 and not watch.started
    (record,) = caplog.records
    assert "prefill_kernel(stride_bt: i32 (D))" in record.getMessage()
    assert "after start-up" in record.getMessage()
