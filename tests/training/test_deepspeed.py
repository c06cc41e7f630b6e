"""DeepSpeed on two CPU processes: ZeRO-2, and ZeRO-3 with parameters and optimizer offloaded to CPU, give the
loss curve of plain DDP (same math, sharded states), and their outputs load back as compressed models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import REPO, TINY_ARGS, run_distill, step_losses, training_metadata

pytest.importorskip("deepspeed")

RUN = TINY_ARGS + ["--max_steps", "3", "--save_steps", "2", "--use_peft", "true", "--lora_r", "4"]


def _launch(config: str, port: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate" / config),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", port]


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    ddp = run_distill(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *RUN],
                      launcher=_launch("cpu.yaml", "29527"), env={"ACCELERATE_USE_CPU": "1"})
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def ddp_losses(ddp_run) -> dict[int, float]:
    return step_losses(training_metadata(ddp_run)["metrics"]["log_history"], "loss")


def _check_against_ddp(output_dir, ddp_losses: dict[int, float]) -> dict:
    meta = training_metadata(output_dir)
    first_step = next(entry for entry in meta["metrics"]["log_history"] if "loss" in entry)
    assert first_step["epoch"] == 0.5  # two ranks, not one
    losses = step_losses(meta["metrics"]["log_history"], "loss")
    assert sorted(losses) == [1, 2, 3]
    for step in losses:
        assert losses[step] == pytest.approx(ddp_losses[step], rel=1e-4), step
    assert (output_dir / "checkpoint-2" / "trainer_state.json").is_file()
    return meta


@pytest.mark.slow  # the first run JIT-compiles DeepSpeed's CPU communication op (~1-2 min, cached afterwards)
def test_zero2_matches_ddp(tiny_model_dir, tmp_path, ddp_losses):
    zero2 = run_distill(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *RUN],
                        launcher=_launch("zero2.yaml", "29537"), env={"DS_ACCELERATOR": "cpu"}, timeout=600)
    assert zero2.returncode == 0, zero2.stderr[-4000:]
    _check_against_ddp(tmp_path, ddp_losses)


@pytest.mark.slow  # the first run also JIT-compiles DeepSpeedCPUAdam for the offloaded optimizer (~3 min)
def test_zero3_offload_matches_ddp_and_loads(tiny_model_dir, tmp_path, ddp_run, ddp_losses):
    from kvtrain.runtime.pretrained import load_compressed
    from kvtrain.runtime.replay import replay_compression

    zero3 = run_distill(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *RUN],
                        launcher=_launch("zero3.yaml", "29547"), env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    assert zero3.returncode == 0, zero3.stderr[-4000:]
    meta = _check_against_ddp(tmp_path, ddp_losses)
    # Partitioned weights only run inside the engine: loyalty before training is measured at train begin.
    assert set(meta["metrics"]["loyalty"]) == {"before", "after"}
    # The gathered adapter ZeRO-3 saved is the one DDP trained: both load and compute the same logits.
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))
    logits = []
    for folder in (tmp_path, ddp_run):
        model, _, config = load_compressed(folder)
        with torch.no_grad(), replay_compression(model, config, prefill_len=16):
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)

    # Resumed from step 2, the untrained model is gone: the run takes its `before` from the checkpoint.
    resumed = run_distill(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *RUN,
                           "--resume", str(tmp_path / "checkpoint-2")],
                          launcher=_launch("zero3.yaml", "29557"), env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    resumed_meta = training_metadata(tmp_path)
    assert resumed_meta["resumed_from"] == str(tmp_path / "checkpoint-2")
    assert step_losses(resumed_meta["metrics"]["log_history"], "loss")[3] == pytest.approx(ddp_losses[3], rel=1e-4)
    assert resumed_meta["metrics"]["loyalty"]["before"] == meta["metrics"]["loyalty"]["before"]
