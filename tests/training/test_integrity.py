"""Integrity on every read: a file kvtrain wrote and reads back is checked against the sha256 recorded when it was
written, so a flipped byte or a truncated copy is refused naming the file instead of being used. Training
checkpoints (weights, optimizer, scheduler, trainer state: a manifest per checkpoint), calibration checkpoints
(progress file and accumulators), JSON artifacts; and the run record fingerprints the training data, so resuming on
a rewritten data file is refused like any other changed argument."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kvtrain.calibrate.run import _State
from kvtrain.errors import UserError
from kvtrain.io import LOCK_FILE, MANIFEST, CorruptFileError, process_umask, read_checked_json, write_checked_json
from kvtrain.training.resume import checkpoint_problem, resolve_resume
from tests.damage import flip, truncate
from tests.training.conftest import TINY_ARGS, run_distill, training_metadata


def _args(model_dir, out, *extra):
    return ["--model_name_or_path", str(model_dir), "--output_dir", str(out), *TINY_ARGS, "--loyalty_blocks", "0", *extra]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """An output folder with checkpoint-1 and checkpoint-2 of a tiny distillation."""
    out = tmp_path_factory.mktemp("integrity") / "out"
    done = run_distill(_args(tiny_model_dir, out, "--max_steps", "2", "--save_steps", "1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("damage", [flip, truncate])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"])
def test_a_damaged_checkpoint_file_is_named_skipped_by_latest_and_refused_by_path(trained, tmp_path, name, damage):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    assert (out / "checkpoint-2" / MANIFEST).is_file() and checkpoint_problem(out / "checkpoint-2") is None
    damage(out / "checkpoint-2" / name)
    problem = checkpoint_problem(out / "checkpoint-2")
    assert problem is not None and problem.startswith(name), problem
    assert resolve_resume("latest", out) == str(out / "checkpoint-1")
    with pytest.raises(UserError, match=rf"checkpoint-2'?: not a complete checkpoint: {name}"):
        resolve_resume(str(out / "checkpoint-2"), out)


def test_resume_latest_trains_on_from_the_intact_checkpoint_not_the_flipped_one(trained, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    flip(out / "checkpoint-2" / "model.safetensors")
    resumed = run_distill(_args(tiny_model_dir, out, "--max_steps", "2", "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping" in resumed.stderr and "checkpoint-2: model.safetensors does not match the sha256" in resumed.stderr
    assert training_metadata(out)["resumed_from"] == str(out / "checkpoint-1")


def test_resuming_on_a_rewritten_data_file_is_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "train.txt"
    words = "the cat sat on the mat and the dog ran to the park " * 40
    data.write_text(words)
    out = tmp_path / "out"
    first = run_distill(_args(tiny_model_dir, out, "--max_steps", "1", "--save_steps", "1", "--dataset_name", str(data)))
    assert first.returncode == 0, first.stderr[-2000:]
    data.write_text(words.replace("cat", "cow"))
    resumed = run_distill(_args(tiny_model_dir, out, "--max_steps", "2", "--resume", "latest", "--dataset_name",
                                str(data)))
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert "data.sha256:" in resumed.stderr and "differ from the run that wrote it" in resumed.stderr
    assert not (out / LOCK_FILE).exists()  # refused after taking the folder: it gives it back


def test_mid_run_checkpoint_weights_follow_the_umask(trained):
    """safetensors writes its files private (0600); a checkpoint's weights get what open() would have given them."""
    for weights in trained.glob("checkpoint-*/*.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~process_umask(), weights


def test_a_damaged_calibration_checkpoint_is_refused(tmp_path):
    state = _State(tmp_path, {"model": "m"})
    state.save(None, 2, {"grams": torch.arange(64, dtype=torch.float32)})
    assert state.load()["blocks_done"] == 2
    (accumulators,) = tmp_path.glob("accumulators-*.safetensors")
    original = accumulators.read_bytes()
    for damage in (flip, truncate):
        accumulators.write_bytes(original)
        damage(accumulators)
        with pytest.raises(UserError, match=rf"{accumulators.name}: does not match the sha256"):
            state.load()
    accumulators.write_bytes(original)
    progress = tmp_path / "progress.json"
    progress.write_text(progress.read_text().replace('"blocks_done": 2', '"blocks_done": 3'))
    with pytest.raises(UserError, match=r"progress.json: its content does not match the sha256"):
        state.load()


def test_a_checked_json_file_refuses_any_edit_and_a_truncation(tmp_path):
    path = tmp_path / "head_budgets.json"
    write_checked_json(path, {"budgets": [8, 16]})
    assert read_checked_json(path, "head-budgets file") == {"budgets": [8, 16]}
    path.write_text(path.read_text().replace("16", "61"))
    with pytest.raises(CorruptFileError, match=r"head_budgets.json: its content does not match the sha256"):
        read_checked_json(path, "head-budgets file")
    path.write_text(path.read_text()[:10])
    with pytest.raises(CorruptFileError, match=r"head_budgets.json: not valid JSON .*damaged or truncated"):
        read_checked_json(path, "head-budgets file")
    path.write_text(json.dumps({"budgets": [8, 16]}))  # written by hand: no digest to compare
    assert read_checked_json(path, "head-budgets file") == {"budgets": [8, 16]}
