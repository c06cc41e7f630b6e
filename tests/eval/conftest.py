"""Tiny models for the evaluation tests: built once per session, saved like a Hub checkpoint when a path is needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtrain import KVCompressionConfig, tiny_model, tiny_tokenizer

# head_dim 16, so that 4-bit TaDA groups of 16 fit; two layers, 2 KV heads.
TINY = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models decode 4x faster on one thread than on two on the shared 2-core machines (each step is a
    few hundred small ops, and a second thread only adds synchronisation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of a random tiny Llama and the offline word-level tokenizer."""
    return tiny_model("llama", **TINY), tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny) -> Path:
    folder = tmp_path_factory.mktemp("tiny-eval")
    model, tokenizer = tiny
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def evict_config(**overrides) -> KVCompressionConfig:
    data = {"budget": None, "compression_ratio": 0.5, "scorer": {"name": "snapkv", "params": {"window": 4}},
            "selection": "per_layer", "sinks": 2, "recent": 4, "query_window": 4, "schedule": {"interval": 8}}
    data.update(overrides)
    return KVCompressionConfig.from_dict(data)
