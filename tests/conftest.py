"""Shared test setup: deterministic seeds, few threads (the CI machines have 2 shared cores), one SmolLM2 load."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, loaded once per session for all slow tests."""
    from kvtrain.models import load_model

    return load_model("smollm2-135m")
