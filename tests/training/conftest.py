"""Fixtures for the distillation tests: a saved tiny model + tokenizer, and launching train/distill.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DISTILL = REPO / "train" / "distill.py"

# A tiny LoRA-free run: 32-token blocks, the first 16 the prompt, compressed to 8 keys per head with an
# event every 4 decode steps, so every continuation token attends a compressed cache.
TINY_ARGS = [
    "--block_len", "32", "--prefill_len", "16", "--max_blocks", "8",
    "--kv_budget", "8", "--kv_sinks", "2", "--kv_recent", "2", "--kv_window", "4", "--kv_interval", "4",
    "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none",
    "--learning_rate", "1e-2", "--loyalty_blocks", "1", "--dataloader_num_workers", "0",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Llama and the offline word-level tokenizer, saved like a Hub checkpoint."""
    from kvtrain.models import tiny_model, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def run_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    return env


def run_distill(args: list[str], *, launcher: list[str] | None = None, env: dict[str, str] | None = None,
                script: Path = DISTILL, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train/distill.py (or a wrapper script) in a fresh process; returns the finished process."""
    cmd = (launcher or [sys.executable]) + [str(script)] + args
    return subprocess.run(cmd, cwd=REPO, env={**run_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)


def training_metadata(output_dir: Path) -> dict:
    return json.loads((output_dir / "kvtrain_training.json").read_text())


def step_losses(log_history: list[dict], key: str = "distill_loss") -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in log_history if key in entry}
