"""Running Triton kernels on the CPU in tests, through Triton's interpreter.

TRITON_INTERPRET must be set before triton itself is imported (triton.language's own jit helpers
are decorated at import time), and conftest already imports triton via transformers. So a test
file re-runs itself in a subprocess with TRITON_INTERPRET=1 (`run_under_interpreter`), where its
kernel tests execute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def require_triton() -> None:
    """Skips the calling test or module without triton, except in CI (which sets CI and installs triton): there
    the kernels must run, so a missing triton fails instead of quietly skipping them."""
    if os.environ.get("CI"):
        import triton  # noqa: F401  (an ImportError here is the failure)
    else:
        pytest.importorskip("triton")


def run_under_interpreter(test_file: str) -> None:
    """Runs a test file's tests in a pytest subprocess under the interpreter; fails with its output."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(test_file).resolve())]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


def fix_interpreter() -> None:
    """Patches two interpreter bugs that the compiled kernels do not have.

    - triton 3.6 calls int() on 1-element arrays, a TypeError since numpy 2.4: that breaks
      `range(start, end)` over loaded scalars (triton-lang/triton#9171, fixed upstream by #9172).
      `__index__` takes the element explicitly instead.
    - triton 3.9 keeps an integer comparison's result in the operands' integer type, so a mask
      built from a loaded scalar (`slot >= 0`) reaches a load or store as int32 and is refused
      ("mask has unsupported dtype"). Masks are made boolean before the memory op.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is not None:

        def patched(tensor: type, scope: interpreter._LangPatchScope) -> None:
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patched

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def as_bool(mask: interpreter.TensorHandle) -> interpreter.TensorHandle:
        return mask if mask.data.dtype == bool else interpreter.TensorHandle(mask.data != 0, mask.dtype)

    builder.create_masked_load = lambda self, ptrs, mask, *rest: load(self, ptrs, as_bool(mask), *rest)
    builder.create_masked_store = lambda self, ptrs, value, mask, *rest: store(self, ptrs, value, as_bool(mask), *rest)


def ptxas_log(ptx: str) -> str:
    """`ptxas -v` of a PTX text for sm_90a, with the ptxas triton itself uses for that target (triton
    3.9 ships a second, newer one for sm_90 and up); fails on an error. Returns its report."""
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(90)
    except TypeError:  # older triton: one ptxas for every target
        tool = compiler.get_ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run([tool.path, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    assert log.returncode == 0, log.stderr
    return log.stderr


def build_for_h100(fn: object, sig: dict[str, str], consts: dict, options: dict) -> tuple[str, str]:
    """(PTX, `ptxas -v` report) of a @triton.jit kernel built for sm_90a as the runtime would build
    it, with every pointer and stride argument 16-byte aligned. Needs triton's NVIDIA backend (its
    bundled ptxas), not a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names  # type: ignore[attr-defined]
    aligned = [i for i, n in enumerate(names) if sig[n][0] == "*" or "stride" in n]
    src = ASTSource(fn, sig, consts, {(i,): [["tt.divisibility", 16]] for i in aligned})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    return ptx, ptxas_log(ptx)
