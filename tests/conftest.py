"""Shared test setup: deterministic seeds, few threads (the CI machines have 2 shared cores), one SmolLM2 load."""

from __future__ import annotations

import os

import torch

# The Triton interpreter must be chosen before triton is first imported, and stay on for the process; on a
# CUDA machine the kernel tests run the compiled kernels instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, loaded once per session for all slow tests."""
    from kvtrain.models import load_model

    return load_model("smollm2-135m")
