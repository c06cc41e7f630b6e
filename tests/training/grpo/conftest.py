"""Launching train/grpo.py (through the tests' wrapper, which registers a reward a random model earns unevenly)."""

from __future__ import annotations

import sys
from pathlib import Path

import tests.training.grpo.uneven_rewards  # noqa: F401 - registers letter_e for in-process runs
from tests.training.conftest import REPO, run_distill

GRPO_SCRIPT = Path(__file__).with_name("grpo_script.py")
ACCELERATE_CPU = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", "2"]

# A tiny run: passkey prompts of ~20 word-level tokens compressed to 8 keys per KV head, an event every 4 decode
# steps, so every 12-token completion is sampled (and trained) across several decode-time evictions.
TINY_GRPO = [
    "--task", "passkey", "--task_param", "filler=3", "--prompt_format", "plain", "--train_items", "16",
    "--rewards", "letter_e",
    "--kv_scorer", "gkv", "--kv_budget", "8", "--kv_sinks", "2", "--kv_recent", "2", "--kv_window", "4",
    "--kv_interval", "4",
    "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "12",
    "--temperature", "1.0", "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none",
    "--bf16", "false", "--dataloader_num_workers", "0",
]


def run_grpo(args: list[str], **kwargs):
    return run_distill(args, script=GRPO_SCRIPT, **kwargs)


def step_metric(log_history: list[dict], key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in log_history if key in entry}
