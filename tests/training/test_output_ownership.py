"""An output folder belongs to one run: a second job on it fails at once naming the first; a resumed run must be
the run it resumes (or say how it differs); a broken checkpoint is named and skipped by --resume latest."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from kvtrain.io import LOCK_FILE
from tests.training.conftest import DISTILL, REPO, TINY_ARGS, run_distill, run_env, training_metadata


def _args(model_dir, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(out), *TINY_ARGS, "--loyalty_blocks", "0", *extra]


def test_a_second_job_on_a_running_jobs_output_fails_at_once_naming_it(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(DISTILL), *_args(tiny_model_dir, out, "--max_steps", "100000")],
                             cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / LOCK_FILE).exists()
        started = time.monotonic()
        second = run_distill(_args(tiny_model_dir, out, "--max_steps", "1"))
        assert second.returncode == 2
        assert f"in use by another job (pid {first.pid}" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr and second.stderr.count("error:") == 1
        assert time.monotonic() - started < 60  # refused before any model was loaded or step run
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The first job was killed: its lock is stale, and the next run takes it over and releases it.
    third = run_distill(_args(tiny_model_dir, out, "--max_steps", "1"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert "taking over the lock" in third.stderr
    assert not (out / LOCK_FILE).exists()


def test_resuming_with_changed_arguments_is_refused_unless_allowed(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    first = run_distill(_args(tiny_model_dir, out, "--max_steps", "2", "--save_steps", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    changed = run_distill(_args(tiny_model_dir, out, "--max_steps", "3", "--resume", "latest", "--learning_rate",
                                "5e-3", "--kv_budget", "6"))
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "training.learning_rate: 0.01 -> 0.005" in changed.stderr
    assert "compression.budget: 8 -> 6" in changed.stderr
    assert "max_steps" not in changed.stderr.split("differ from the run that wrote it")[1]  # free to change
    assert not (out / LOCK_FILE).exists()  # a job stopped by a user error lets go of the folder
    allowed = run_distill(_args(tiny_model_dir, out, "--max_steps", "3", "--resume", "latest", "--learning_rate",
                                "5e-3", "--allow_resume_changes", "true"))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    metadata = training_metadata(out)
    assert metadata["resumed_from"] == str(out / "checkpoint-2")
    assert metadata["resume_changes"] == ["training.learning_rate: 0.01 -> 0.005"]


def test_resume_latest_skips_a_broken_checkpoint_saying_so(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    first = run_distill(_args(tiny_model_dir, out, "--max_steps", "2", "--save_steps", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    (out / "checkpoint-2" / "trainer_state.json").write_text("{truncated")
    resumed = run_distill(_args(tiny_model_dir, out, "--max_steps", "2", "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping" in resumed.stderr and "checkpoint-2: trainer_state.json has 10 bytes" in resumed.stderr
    assert training_metadata(out)["resumed_from"] == str(out / "checkpoint-1")
    # Named explicitly, a broken checkpoint is an error naming what is wrong.
    (out / "checkpoint-1" / "trainer_state.json").unlink()
    explicit = run_distill(_args(tiny_model_dir, out, "--max_steps", "2", "--resume", str(out / "checkpoint-1")))
    assert explicit.returncode == 2 and "not a complete checkpoint: trainer_state.json is missing" in explicit.stderr


def test_one_message_under_a_two_process_launch(tiny_model_dir, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", "2", "--main_process_port", "29541"]
    proc = run_distill(_args(tiny_model_dir, tmp_path / "out", "--kv_config", "/nonexistent/kv.yaml"),
                       launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("train/distill.py: error:")]
    assert ours == ["train/distill.py: error: /nonexistent/kv.yaml: cannot read the compression config "
                    "(No such file or directory)"], proc.stderr[-3000:]
