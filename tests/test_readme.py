"""Every Python example in the README runs, in order, as a user would paste it, with `load_model` giving a
tiny model (the README names the embedded SmolLM2; its real-model paths are covered by tests marked `slow`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import kvtrain
from kvtrain.models import tiny_model, tiny_tokenizer

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return PYTHON_BLOCK.findall(text)


def run_blocks(blocks: list[str]) -> dict:
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    return namespace


@pytest.fixture
def tiny_load_model(monkeypatch):
    def load_model(name_or_path, **kwargs):
        return tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=128), tiny_tokenizer()

    monkeypatch.setattr(kvtrain, "load_model", load_model)


def test_the_readme_has_python_examples():
    assert len(python_blocks(README.read_text())) >= 1


def test_every_python_example_runs(tiny_load_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_blocks(python_blocks(README.read_text()))
    # The example really compressed: fewer tokens held than seen, and the replayed forward ran.
    cache = namespace["cache"]
    assert int(cache.stored_tokens()[0].max()) < cache.get_seq_length()
    assert namespace["logits"].shape[1] == namespace["out"].shape[1]


def test_a_broken_example_fails(tiny_load_model):
    broken = python_blocks(README.read_text())
    broken[0] = broken[0].replace("replay_compression(", "replay_compresion(")
    with pytest.raises(NameError, match="replay_compresion"):
        run_blocks(broken)
