"""The one kernel switch: whether attention runs the Triton kernels or the PyTorch references.

Vocabulary (the environment variable ``KVTRAIN_KERNELS``, read at every call, and each kernel's ``force=``
argument alike): ``auto`` (the default: Triton on CUDA tensors, PyTorch elsewhere), ``triton`` (always the
kernels; on CPU tensors only under the Triton interpreter, ``TRITON_INTERPRET=1`` set before triton is first
imported, which is how the tests run them without a GPU) and ``torch`` (never). ``force=None`` defers to the
environment variable.
"""

from __future__ import annotations

import os

import torch

KERNELS_ENV = "KVTRAIN_KERNELS"
BACKENDS = ("auto", "triton", "torch")


def use_triton(force: str | None, device: torch.device) -> bool:
    """True when the Triton kernel should run for tensors on `device` (see the module docstring)."""
    if force is None:
        choice = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
        if choice not in BACKENDS:
            raise ValueError(f"{KERNELS_ENV}={os.environ[KERNELS_ENV]!r} must be one of {', '.join(BACKENDS)}")
    elif force in BACKENDS:
        choice = force
    else:
        raise ValueError(f"force={force!r} must be None or one of {BACKENDS}")
    if choice == "auto":
        return device.type == "cuda"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"Triton kernels on {device.type} tensors need TRITON_INTERPRET=1 set before triton is imported"
        )
    return choice == "triton"


def use_kernels(device: torch.device) -> bool:
    """Whether attention on `device` runs the Triton kernels, as ``KVTRAIN_KERNELS`` says."""
    return use_triton(None, device)


def padded(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): ``tl.arange`` needs powers of two and ``tl.dot`` needs >= 16."""
    size = minimum
    while size < n:
        size *= 2
    return size
