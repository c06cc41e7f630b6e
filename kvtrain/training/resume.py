"""What a resumed run must share with the run it resumes, and which checkpoint it resumes from.

Each checkpoint records the arguments that define the run (`RUN_FILE`): the compression config, the
distillation (or GRPO task) arguments, the model, the optimisation settings and a fingerprint of the training data
read (so a data file rewritten under the same name counts as a change). Resuming compares them with the new run's
and refuses a change (listing each field, old and new) unless `allow_resume_changes` says to go on, in which
case the changes are recorded in the output's metadata. What does not change what is learnt (how long to
train, how often to log or save, where to report, the loyalty measurement) may change freely.

`--resume latest` takes the newest *intact* checkpoint, saying which broken ones it skipped; a checkpoint
named explicitly must be intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from safetensors import safe_open

from kvtrain.errors import UserError
from kvtrain.io import manifest_problem
from kvtrain.training import checkpoints

logger = logging.getLogger(__name__)

RUN_FILE = "kvtrain_run.json"
# Fields that do not change what a run learns: they may differ between a run and its resumption.
FREE_TO_CHANGE = {
    "distillation": {"resume", "allow_resume_changes", "loyalty_dataset_name", "loyalty_split", "loyalty_blocks"},
    "task": {"resume", "allow_resume_changes", "log_naive_gap"},
    "model": set(),
    "training": {
        "output_dir", "max_steps", "num_train_epochs", "logging_steps", "logging_first_step", "logging_strategy",
        "logging_dir", "save_steps", "save_strategy", "save_total_limit", "report_to", "run_name",
        "resume_from_checkpoint", "disable_tqdm", "log_level", "log_level_replica", "dataloader_num_workers",
        "eval_steps", "eval_strategy", "push_to_hub", "hub_model_id", "hub_token", "overwrite_output_dir",
    },
}


def run_record(run_args, kv_config, training_args, model_args, *, data: str, section: str = "distillation") -> dict[str, Any]:
    """The arguments that define a run, as JSON-ready values (what `RUN_FILE` holds); `run_args` are the entry
    point's own arguments, recorded under `section` (distillation, or task for GRPO); `data` the fingerprint of the
    training data read (`kvtrain.data.texts_fingerprint`)."""
    return {
        "compression": kv_config.to_dict(),
        section: dataclasses.asdict(run_args),
        "model": dataclasses.asdict(model_args),
        "training": json.loads(training_args.to_json_string()),
        "data": {"sha256": data},
    }


def changed_fields(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.field: old -> new`` for every run-defining field that differs."""
    changes = []
    for section in ("compression", "distillation", "task", "model", "training", "data"):
        old, new = recorded.get(section, {}), current.get(section, {})
        for name in sorted(set(old) | set(new)):
            if name in FREE_TO_CHANGE.get(section, set()) or old.get(name) == new.get(name):
                continue
            changes.append(f"{section}.{name}: {old.get(name)!r} -> {new.get(name)!r}")
    return changes


def check_resume(checkpoint: str | Path, current: dict[str, Any], allow_changes: bool) -> list[str]:
    """The changes against `checkpoint`'s run (empty when none); raises when there are some and they are not allowed."""
    path = Path(checkpoint) / RUN_FILE
    if not path.is_file():
        logger.warning("%s records no run arguments (written by an older kvtrain): the resumed run is not compared "
                       "with it", checkpoint)
        return []
    changes = changed_fields(json.loads(path.read_text()), current)
    if changes and not allow_changes:
        raise UserError(
            f"resume from {checkpoint}: these arguments differ from the run that wrote it: {'; '.join(changes)}. "
            "Resume with the original values, or pass --allow_resume_changes true to go on with the new ones "
            "(they are recorded in kvtrain_training.json)"
        )
    return changes


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (a file not as written, missing or unreadable parts), or None when it is
    intact."""
    damaged = manifest_problem(folder)
    if damaged is not None:
        return damaged
    state = folder / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"trainer_state.json is unreadable ({err})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("global_step*")):
        return "no weights (*.safetensors or a DeepSpeed global_step folder)"
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for damaged files
            return f"{file.name} is damaged ({err})"
    return None


def resolve_resume(resume: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint to resume from: None, 'latest' (newest intact checkpoint, or a fresh start) or a path."""
    if resume is None or str(resume).lower() in ("", "false", "none"):
        return None
    if str(resume).lower() in ("latest", "true"):
        for folder in checkpoints.complete_checkpoints(output_dir):
            problem = checkpoint_problem(folder)
            if problem is None:
                logger.info("resuming from %s", folder)
                return str(folder)
            logger.warning("resume=latest: skipping %s: %s", folder, problem)
        logger.warning("resume=latest: no intact checkpoint in %s, starting from scratch", output_dir)
        return None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"resume={resume!r}: not a complete checkpoint (no such folder)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UserError(f"resume={resume!r}: not a complete checkpoint: {problem}")
    return str(path)
