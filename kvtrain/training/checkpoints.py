"""Atomic Trainer checkpoints: a run killed while saving leaves every earlier checkpoint intact and usable.

transformers 5.23 writes `checkpoint-N` in place (model, optimizer, scheduler, RNG, trainer state, in that
order), so a kill mid-save leaves a `checkpoint-N` that `get_last_checkpoint` would pick although it has no
trainer state or optimizer. We let the Trainer write `tmp-checkpoint-N` instead and, once every rank has
finished, rename it to `checkpoint-N` in one `os.replace`. Leftover `tmp-checkpoint-*` folders are ignored
by `get_last_checkpoint` (its pattern is `^checkpoint-\\d+$`) and removed by the next save of that step.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import transformers.trainer as hf_trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

STAGING_PREFIX = "tmp-checkpoint"
_COMPLETE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


@contextlib.contextmanager
def staging_prefix():
    """Make `Trainer._save_checkpoint` name its folder `tmp-checkpoint-N` (it reads this module global)."""
    original = hf_trainer.PREFIX_CHECKPOINT_DIR
    hf_trainer.PREFIX_CHECKPOINT_DIR = STAGING_PREFIX
    try:
        yield
    finally:
        hf_trainer.PREFIX_CHECKPOINT_DIR = original


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{STAGING_PREFIX}-{step}"


def final_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def publish(staging: Path, target: Path) -> None:
    """Rename a finished staging folder to its final name (replacing an older folder of that name)."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The published checkpoints of `run_dir`, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _COMPLETE.match(p.name))]
    return [p for _, p in sorted(steps, reverse=True)]
