"""train/distill.py end to end: two CPU processes through `accelerate launch`, loading the result in one
call, and bad input (unwritable output dir, artifacts of another model, unsupported options)."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from kvtrain.models import model_fingerprint, tiny_model, tiny_tokenizer
from kvtrain.runtime.pretrained import load_compressed
from kvtrain.training.run import main
from tests.training.conftest import REPO, TINY_ARGS, run_distill, step_losses, training_metadata

ACCELERATE_CPU = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "configs/accelerate/cpu.yaml"), "--num_processes", "2", "--main_process_port", "29517"]


@pytest.fixture(scope="module")
def ddp_output(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    args = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *TINY_ARGS,
            "--max_steps", "3", "--save_strategy", "no", "--use_peft", "true", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "v_proj", "--on_policy_fraction", "0.5"]
    proc = run_distill(args, launcher=ACCELERATE_CPU, env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_two_process_run_shards_data_and_loads_in_one_call(ddp_output, tiny_model_dir):
    metadata = training_metadata(ddp_output)
    assert metadata["arguments"]["training"]["per_device_train_batch_size"] == 2
    history = metadata["metrics"]["log_history"]
    # 8 blocks, 2 per device: with 2 ranks an epoch is 2 steps, alone it would be 4.
    epochs = {e["step"]: e["epoch"] for e in history if "distill_loss" in e}
    assert epochs == {1: 0.5, 2: 1.0, 3: 1.5}
    assert sorted(step_losses(history)) == [1, 2, 3]
    assert set(metadata["metrics"]["loyalty"]) == {"before", "after"}

    model, tokenizer, config = load_compressed(ddp_output)
    assert type(model).__name__ == "PeftModelForCausalLM" and metadata["format"] == "adapter"
    assert config.budget == 8 and config.schedule.interval == 4 and tokenizer.pad_token == "<pad>"
    # the adapter was trained: it is no longer the identity (LoRA starts with B = 0)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)
    ids = torch.tensor([tokenizer("the quick brown fox")["input_ids"]])
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, base)


def test_artifacts_of_another_model_are_refused(ddp_output, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    shutil.copytree(ddp_output / "kv_compression", other / "kv_compression")
    shutil.copy(ddp_output / "kvtrain_training.json", other / "kvtrain_training.json")
    with pytest.raises(ValueError, match=r"different model.*num_hidden_layers: 2 in the artifacts, 3 for this model"):
        load_compressed(other)


def test_merged_full_weights_load_with_matching_fingerprint(tiny_model_dir, tmp_path):
    main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *TINY_ARGS, "--max_steps", "1",
          "--save_strategy", "no", "--use_peft", "true", "--lora_r", "4", "--merge_adapter", "true", "--use_cpu", "true"])
    model, _, config = load_compressed(tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM" and not (tmp_path / "adapter_config.json").exists()
    assert training_metadata(tmp_path)["model_fingerprint"] == model_fingerprint(model.config)
    assert config.budget == 8


def test_unwritable_output_dir_fails_before_loading_the_model(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the model path does not exist either: the error must be about the output folder, checked first
    with pytest.raises(ValueError, match=r"output_dir .*a-file/out.*a-file.* is a file, so the folder cannot be created"):
        main(["--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(blocker / "out"), *TINY_ARGS])


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--resume", "/nonexistent/checkpoint-9"], "not a complete checkpoint"),
    ],
)
def test_unsupported_options_fail_clearly(tiny_model_dir, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *TINY_ARGS, *extra])


def test_resume_latest_without_checkpoint_starts_fresh(tiny_model_dir, tmp_path):
    main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *TINY_ARGS, "--max_steps", "1",
          "--save_strategy", "no", "--loyalty_blocks", "0", "--resume", "latest", "--use_cpu", "true"])
    assert training_metadata(tmp_path)["resumed_from"] is None


def test_report_to_wandb_offline_writes_a_run(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"), *TINY_ARGS,
          "--max_steps", "2", "--save_strategy", "no", "--report_to", "wandb", "--use_cpu", "true"])
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_fsdp_on_a_cpu_machine_is_refused_not_run_as_ddp(monkeypatch):
    from kvtrain.training.run import init_cpu_distributed

    if torch.cuda.is_available():
        pytest.skip("FSDP is available with GPUs")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP needs GPUs"):
        init_cpu_distributed()
