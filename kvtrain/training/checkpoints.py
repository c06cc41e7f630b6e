"""Atomic Trainer checkpoints: a run killed while saving leaves every earlier checkpoint intact and usable.

transformers 5.23 writes `checkpoint-N` in place (model, optimizer, scheduler, RNG, trainer state, in that
order), so a kill mid-save leaves a `checkpoint-N` that `get_last_checkpoint` would pick although it has no
trainer state or optimizer. We let the Trainer write `tmp-checkpoint-N` instead and, once every rank has
finished, rename it to `checkpoint-N` in one `os.replace`. Leftover `tmp-checkpoint-*` folders are ignored
by `get_last_checkpoint` (its pattern is `^checkpoint-\\d+$`) and removed by the next save of that step.
Before the rename, the size and sha256 of every file the ranks wrote go into the checkpoint's manifest
(`kvtrain.io.write_manifest`), which resuming checks (`kvtrain.training.resume.checkpoint_problem`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path

import transformers.trainer as hf_trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from kvtrain.io import permissions_as_created, write_manifest

STAGING_PREFIX = "tmp-checkpoint"
_COMPLETE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Modules whose `_save_checkpoint` names the checkpoint folder from their own copy of the prefix: transformers'
# Trainer, and TRL's GRPOTrainer (which writes its entropy-controller state into that folder).
_PREFIX_READERS = ("transformers.trainer", "trl.trainer.grpo_trainer")


@contextlib.contextmanager
def staging_prefix():
    """Make `Trainer._save_checkpoint` name its folder `tmp-checkpoint-N` (it reads a module global)."""
    modules = [sys.modules[name] for name in _PREFIX_READERS if name in sys.modules]
    originals = [m.PREFIX_CHECKPOINT_DIR for m in modules]
    for module in modules:
        module.PREFIX_CHECKPOINT_DIR = STAGING_PREFIX
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.PREFIX_CHECKPOINT_DIR = original


class AtomicCheckpoints:
    """Trainer mixin (put it before the Trainer class): checkpoints are written as `tmp-checkpoint-N` on every
    rank and published as `checkpoint-N` in one rename once all ranks are done. `save_extra_files(staging)`
    adds files of its own to a checkpoint (main process only)."""

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging = staging_dir(run_dir, self.state.global_step)
        if self.args.should_save and staging.exists():  # left by a run killed while saving this step
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        with staging_prefix():
            super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self.save_extra_files(staging)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            permissions_as_created(staging.rglob("*.safetensors"))  # weights: private as safetensors writes them
            write_manifest(staging)
            publish(staging, final_dir(run_dir, self.state.global_step))
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_extra_files(self, staging: Path) -> None:
        """Write this trainer's own files into the staging folder of a checkpoint (none by default)."""


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
