"""What every training entry point (`train/distill.py`, `train/grpo.py`) does before its trainer exists: parse a
recipe plus `--field value` overrides into its argument dataclasses, check the training length and the output
folder, lock the output folder, refuse sequences longer than a sliding window, create the CPU process group.
Resume checks live in `kvtrain.training.resume`, model options in `kvtrain.training.model_options`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainingArguments
from trl import ModelConfig, TrlParser

from kvtrain.errors import UserError, said_once
from kvtrain.io import OutputLock, check_writable
from kvtrain.models.loading import load_config
from kvtrain.models.shape import check_positions, check_window, sliding_windows
from kvtrain.training.recipe import load_recipe

logger = logging.getLogger(__name__)


def parse_recipe_args(argument_types: tuple[type, ...], argv: list[str] | None = None) -> tuple:
    """One instance per dataclass of `argument_types`, from `--config recipe.yaml` (checked by `load_recipe`)
    overridden by `--field value` flags. `model_name_or_path` is required."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser(argument_types)
    defaults: dict = {}
    for i, arg in enumerate(args):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else args[i + 1]
            del args[i : i + (1 if "=" in arg else 2)]
            defaults = load_recipe(path, argument_types)
            break
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # init_cpu_distributed made the process group: TrainingArguments must reuse it, not rebuild it
        # (it would for DeepSpeed without a backend, i.e. as one process).
        accelerator_config = defaults.get("accelerator_config") or {}
        if isinstance(accelerator_config, dict):
            defaults["accelerator_config"] = {**accelerator_config, "use_configured_state": True}
    parser.set_defaults_with_config(**defaults)
    with said_once():
        parsed = parser.parse_args_into_dataclasses(args=args)
    if not any(getattr(p, "model_name_or_path", None) for p in parsed):
        raise ValueError("model_name_or_path is required (in the recipe or as --model_name_or_path)")
    return tuple(parsed)


def check_output_dir(path: str | Path) -> None:
    """Fail before any model is loaded when `output_dir` cannot be created or written, creating nothing: an input
    refused later must leave no folder behind."""
    check_writable(path, "output_dir", folder=True)


def init_cpu_distributed() -> None:
    """On GPU-less machines launched with several processes, create the process group with gloo ourselves.

    Without it, `accelerate launch --multi_gpu` starts unsynchronised single-process runs, and DeepSpeed
    fails a batch-size assertion (TrainingArguments never passes a backend to accelerate); the Trainer
    then reuses this state (`accelerator_config.use_configured_state`).
    """
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # Without an accelerator, accelerate would silently train as plain multi-process DDP.
        raise ValueError(
            "FSDP needs GPUs (accelerate shards only on an accelerator device); on CPU launch with "
            "configs/accelerate/cpu.yaml (DDP over gloo), zero2.yaml or zero3.yaml (DeepSpeed over gloo)"
        )
    from accelerate import PartialState

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    PartialState(cpu=not deepspeed, backend="gloo")


def check_training_length(training_args: TrainingArguments) -> None:
    """A run must train: at least one step (or, with max_steps -1, a positive number of epochs)."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise UserError(f"max_steps={training_args.max_steps}: must be >= 1 (or -1 to train num_train_epochs)")
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        raise UserError(f"num_train_epochs={training_args.num_train_epochs} with max_steps=-1: nothing would be trained")


@contextlib.contextmanager
def lock_output(output_dir: str | Path, prog: str, argv: list[str] | None) -> Iterator[OutputLock]:
    """Take `output_dir` for this job (see `OutputLock`), logging a stale lock taken over. A job stopped by an error
    inside the block (a bad input found after the folder was taken included) lets go of it; otherwise the lock
    stays taken until the job's `main` releases it."""
    lock = OutputLock(output_dir, " ".join([prog, *(sys.argv[1:] if argv is None else argv)]))
    for warning in lock.acquire():
        logger.warning(warning)
    try:
        yield lock
    except BaseException:
        lock.release()
        raise


def check_length_before_loading(model_args: ModelConfig, length: int, field: str, revision: str | None) -> None:
    """Refuse, from config.json before the weights load, sequences of `length` tokens (the recipe's `field`)
    beyond the model's positions or longer than a sliding-window layer's window (see `check_window`)."""
    _, config = load_config(model_args.model_name_or_path, revision=revision)
    check_positions(config, length, field)
    for layer, window in enumerate(sliding_windows(config)):
        check_window(window, layer, length, f"{model_args.model_name_or_path} with {field}")
