"""Choosing between the Triton kernels and the PyTorch references."""

from __future__ import annotations

import os

import torch

PROVIDERS = ("triton", "reference")


def use_triton(force: str | None, device: torch.device) -> bool:
    """True when the Triton kernel should run: CUDA tensors by default, or ``force="triton"``.

    ``force="triton"`` on CPU tensors only works under the Triton interpreter (``TRITON_INTERPRET=1`` set
    before the kernel modules are imported); that is how the tests exercise the kernels without a GPU.
    """
    if force is None:
        return device.type == "cuda"
    if force not in PROVIDERS:
        raise ValueError(f"force={force!r} must be None or one of {PROVIDERS}")
    if force == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"force='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return force == "triton"


def padded(n: int, minimum: int = 16) -> int:
    """The power of two >= max(n, minimum): ``tl.arange`` needs powers of two and ``tl.dot`` needs >= 16."""
    size = minimum
    while size < n:
        size *= 2
    return size
