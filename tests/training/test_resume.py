"""Kill a run abruptly and resume it: the loss curve must equal an uninterrupted run's, and a kill in the
middle of writing a checkpoint must leave the previous checkpoint as the one resumed from."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers.trainer_utils import get_last_checkpoint

from tests.training.conftest import TINY_ARGS, run_distill, step_losses, training_metadata

KILLABLE = Path(__file__).with_name("killable_distill.py")
# Full fine-tuning with an offloaded frozen teacher, cross-entropy and on-policy steps drawn at random:
# every piece of state that a resume must restore (weights, Adam moments, schedule, data order, RNG) matters.
RUN = TINY_ARGS + ["--max_steps", "4", "--save_steps", "2", "--teacher_offload", "true", "--ce_weight", "0.2",
                   "--on_policy_fraction", "0.5", "--loyalty_blocks", "0", "--lr_scheduler_type", "linear"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = run_distill(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *RUN])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = training_metadata(out)["metrics"]["log_history"]
    losses = step_losses(history)
    assert sorted(losses) == [1, 2, 3, 4]
    assert {e["on_policy"] for e in history if "on_policy" in e} == {0.0, 1.0}  # both kinds of step occur
    return losses


def _kill_then_resume(tiny_model_dir, out: Path, kill: str) -> dict[int, float]:
    args = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *RUN]
    killed = run_distill(args, script=KILLABLE, env={"KVTRAIN_TEST_KILL": kill})
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert not (out / "kvtrain_training.json").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")  # transformers' own choice
    resumed = run_distill(args + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metadata = training_metadata(out)
    assert metadata["resumed_from"] == str(out / "checkpoint-2")
    return step_losses(metadata["metrics"]["log_history"])


def test_kill_after_checkpoint_then_resume_reproduces_the_loss_curve(reference, tiny_model_dir, tmp_path):
    losses = _kill_then_resume(tiny_model_dir, tmp_path, "step:2")
    assert sorted(losses) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), step


def test_kill_while_saving_keeps_previous_checkpoint(reference, tiny_model_dir, tmp_path):
    losses = _kill_then_resume(tiny_model_dir, tmp_path, "save:4")
    for step in (3, 4):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), step
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (tmp_path / "tmp-checkpoint-4").exists()  # the partial folder was replaced by the resumed save
