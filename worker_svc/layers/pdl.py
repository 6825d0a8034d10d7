"""Programmatic dependent launch (PDL, sm_90 and later) for the few-row matmuls of a decode step.

A kernel launched with PDL may start while the kernel before it is still running: its programs
become resident as soon as every program of that kernel has called `gdc_launch_dependents` (or
exited). Before `gdc_wait` such a kernel may only read what no earlier kernel of the step writes
(its weights); after it, every earlier kernel has finished and its writes are visible. A one-row
matmul is bound by the latency of its weight loads more than by bandwidth, so issuing them while
the kernel before drains is where the gain is (layers/gemv.py).

`enter` is the point where a kernel's dependent part begins: wait for the kernel before, then let
the next one launch. Releasing the next kernel before the wait instead let a chain of them become
resident at once and measured slower (docs/lab-notes.md, run AL). Decode attention only releases:
launched plainly, it lets the o projection's GEMV launch once its key loop ends (attention/
triton_kernels.py). Without PDL (CPU tensors under the Triton interpreter, GPUs before sm_90) both
are compiled out.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def enter(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device take part in PDL."""
    return t.device.type == "cuda" and _supported(t.device.index)


def launch_options(t: torch.Tensor) -> dict[str, bool]:
    """The PDL constexpr and launch flag for a kernel on t's device."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {"PDL": False}
