"""Kill a GRPO run abruptly after a checkpoint and resume it: the losses, rewards and replay gaps of every step must
equal an uninterrupted run's (weights, Adam moments, schedule, prompt order and the sampling RNG all restored)."""

from __future__ import annotations

import pytest
from transformers.trainer_utils import get_last_checkpoint

from tests.training.conftest import training_metadata
from tests.training.grpo.conftest import TINY_GRPO, run_grpo, step_metric

# Full fine-tuning, gradient checkpointing (GRPOConfig's default), one generation per two steps (num_iterations 2)
# with a checkpoint at step 2: the resumed run samples step 3's rollouts afresh, as the uninterrupted run does.
RUN = TINY_GRPO + ["--max_steps", "4", "--num_iterations", "2", "--save_steps", "2", "--lr_scheduler_type", "linear"]
KEYS = ("loss", "reward", "logp_gap/replay", "importance/abs_log_ratio")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("grpo-uninterrupted")
    proc = run_grpo(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *RUN])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = training_metadata(out)["metrics"]["log_history"]
    assert sorted(step_metric(history, "loss")) == [1, 2, 3, 4]
    assert any(v != 0.0 for v in step_metric(history, "loss").values())
    return history


def test_kill_after_checkpoint_then_resume_reproduces_the_run(reference, tiny_model_dir, tmp_path):
    args = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *RUN]
    killed = run_grpo(args, env={"KVTRAIN_TEST_KILL": "step:2"})
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert not (tmp_path / "kvtrain_training.json").exists()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    steps_file = tmp_path / "steps-trained.txt"
    resumed = run_grpo(args + ["--resume", "latest"], env={"KVTRAIN_TEST_STEPS": str(steps_file)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_file.read_text().split() == ["3", "4"]  # the resumed process trains only what was left
    metadata = training_metadata(tmp_path)
    assert metadata["resumed_from"] == str(tmp_path / "checkpoint-2")
    history = metadata["metrics"]["log_history"]
    for key in KEYS:
        want, got = step_metric(reference, key), step_metric(history, key)
        assert sorted(got) == sorted(want), key
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), (key, step)


def test_resuming_with_another_learning_rate_is_refused_naming_it(reference, tiny_model_dir, tmp_path):
    """The checkpoint records the run's arguments: a resumed run that would learn differently is refused."""
    args = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *RUN]
    killed = run_grpo(args, env={"KVTRAIN_TEST_KILL": "step:2"})
    assert killed.returncode == 17, killed.stderr[-3000:]
    resumed = run_grpo(args + ["--resume", "latest", "--learning_rate", "5e-3", "--rewards", "task"])
    assert resumed.returncode != 0
    assert "training.learning_rate: 0.01 -> 0.005" in resumed.stderr and "task.rewards" in resumed.stderr, \
        resumed.stderr[-3000:]
