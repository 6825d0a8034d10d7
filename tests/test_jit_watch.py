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


def test_names_the_variants_constexprs(caplog: pytest.LogCaptureFixture) -> None:
    """Triton's repr leaves the constexprs out; the log names them from the kernel's arguments."""

    class Info:
        jit_function = type("Fn", (), {"arg_names": ["q_ptr", "stride", "BLOCK_N", "MIXED"]})()

    watch = CompileWatch()
    with caplog.at_level(logging.WARNING, logger="worker_svc.jit_watch"):
        watch.after(key=1, repr="decode_split_kernel[num_warps=4](q_ptr: ()", fn=Info(),
                    compile={"constants": {(2,): 64, (3,): True, (1,): None}})  # fmt: skip
    assert "constexprs {'BLOCK_N': 64, 'MIXED': True}" in caplog.records[0].getMessage()


def test_install_hooks_its_callbacks_into_triton() -> None:
    knobs = pytest.importorskip("triton").knobs
    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    watch = CompileWatch()
    try:
        watch.install()
        assert knobs.runtime.jit_cache_hook == watch.before and knobs.runtime.jit_post_compile_hook == watch.after
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before
