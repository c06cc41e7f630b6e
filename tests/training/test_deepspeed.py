"""DeepSpeed ZeRO-2 on two CPU processes: the same loss curve as plain DDP (same math, sharded optimizer)."""

from __future__ import annotations

import sys

import pytest

from tests.training.conftest import REPO, TINY_ARGS, run_distill, step_losses, training_metadata

pytest.importorskip("deepspeed")

RUN = TINY_ARGS + ["--max_steps", "3", "--save_steps", "2", "--use_peft", "true", "--lora_r", "4", "--loyalty_blocks", "0"]


def _launch(config: str, port: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate" / config),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", port]


@pytest.mark.slow  # the first run JIT-compiles DeepSpeed's CPU communication op (~1-2 min, cached afterwards)
def test_zero2_matches_ddp(tiny_model_dir, tmp_path):
    ddp = run_distill(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "ddp"), *RUN],
                      launcher=_launch("cpu.yaml", "29527"), env={"ACCELERATE_USE_CPU": "1"})
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    zero2 = run_distill(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "zero2"), *RUN],
                        launcher=_launch("zero2.yaml", "29537"), env={"DS_ACCELERATOR": "cpu"}, timeout=600)
    assert zero2.returncode == 0, zero2.stderr[-4000:]
    ds_meta = training_metadata(tmp_path / "zero2")
    assert ds_meta["metrics"]["log_history"][0]["epoch"] == 0.5  # two ranks, not one
    ds_losses = step_losses(ds_meta["metrics"]["log_history"], "loss")
    ddp_losses = step_losses(training_metadata(tmp_path / "ddp")["metrics"]["log_history"], "loss")
    assert sorted(ds_losses) == [1, 2, 3]
    for step in ds_losses:
        assert ds_losses[step] == pytest.approx(ddp_losses[step], rel=1e-4), step
    assert (tmp_path / "zero2" / "checkpoint-2" / "trainer_state.json").is_file()
