"""What every training entry point (`train/distill.py`, `train/grpo.py`) does before its trainer exists: parse a
recipe plus `--field value` overrides into its argument dataclasses, check the output folder, create the CPU
process group, resolve a resume request, name a dtype."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
from trl import TrlParser

from kvtrain.training import checkpoints
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
    parsed = parser.parse_args_into_dataclasses(args=args)
    if not any(getattr(p, "model_name_or_path", None) for p in parsed):
        raise ValueError("model_name_or_path is required (in the recipe or as --model_name_or_path)")
    return tuple(parsed)


def check_output_dir(path: str | Path) -> None:
    """Fail before any model is loaded when `output_dir` cannot be created or written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"output_dir {str(path)!r} is not writable: {err.strerror or err}") from None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: 'latest' (the newest complete one in `output_dir`, None if there is none)
    or a checkpoint folder."""
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("latest", "true"):
        found = checkpoints.latest_checkpoint(output_dir)
        if found is None:
            logger.warning("resume=latest: no complete checkpoint in %s, starting from scratch", output_dir)
            return None
        logger.info("resuming from %s", found)
        return str(found)
    path = Path(value)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"resume={value!r}: not a complete checkpoint folder (no trainer_state.json)")
    return str(path)


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


def torch_dtype(name: str | None) -> torch.dtype:
    if name in (None, "auto"):
        return torch.float32
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype (e.g. float32, bfloat16)")
    return value
