"""Shared setup for the kernel tests: interpreter mode, device, tolerances.

Import this before ``kvtrain.kernels``. Without a GPU the kernels run in the Triton interpreter, which has to
be switched on before triton is first imported (``triton.jit`` picks the interpreter at decoration time, for
triton's own ``tl.zeros`` & co. too) and stay on while kernels run (triton imports parts of itself lazily on
the first launch). So on a CPU-only machine this sets ``TRITON_INTERPRET=1`` for the rest of the process;
compiled Triton cannot launch there anyway. If triton was already imported without it, the kernel tests
cannot run in this process, and this says so instead of failing obscurely later.
"""

from __future__ import annotations

import os
import sys

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (atol, rtol). fp32: both sides compute in float32, differing only in summation order. fp16/bf16: the kernels
# compute in float32 too (in the interpreter; on a GPU half dots with float32 accumulation), so most of the
# gap is the final rounding of the output (1 ulp: ~1e-3 fp16, ~8e-3 bf16; the interpreter truncates bf16
# rather than rounding), plus on a GPU P rounded to half before the P @ V dot.
FORWARD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# Gradients sum many rounded products, and each input gradient is rounded once more.
GRAD_TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (5e-2, 5e-2)}


def _enable_interpreter() -> None:
    if "triton" in sys.modules:
        import triton.language as tl

        if type(tl.zeros).__name__ != "InterpretedFunction":
            raise RuntimeError(
                "triton was imported before TRITON_INTERPRET=1 was set, so the kernel tests cannot run in this "
                "process; run tests/kernels on its own or set TRITON_INTERPRET=1 in a top-level conftest"
            )
        return
    os.environ["TRITON_INTERPRET"] = "1"


if DEVICE.type == "cpu":
    _enable_interpreter()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    atol, rtol = tol
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
