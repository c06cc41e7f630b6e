"""`train_projections`: the low-rank projections are trained with the student, are an optimizer group of
their own, are saved back as artifacts that `load_compressed` uses, survive kill-and-resume, stay in sync
across DDP ranks, and bad set-ups fail clearly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerCallback

from kvtrain.artifacts.format import sha256_file
from kvtrain.artifacts.projections import read_projections
from kvtrain.calibrate.run import calibrate
from kvtrain.lowrank import LowRankPair
from kvtrain.models import load_model
from kvtrain.runtime.pretrained import load_compressed
from kvtrain.runtime.replay import replay_compression
from kvtrain.training.projections import ATTRIBUTE, CHECKPOINT_FILE
from kvtrain.training.run import main
from tests.training.conftest import REPO, TINY_ARGS, run_distill, step_losses, training_metadata

KILLABLE = Path(__file__).with_name("killable_distill.py")
RANK_DUMP = Path(__file__).with_name("rank_projections_distill.py")
CALIBRATED_RANK, TRAINED_RANK = 6, 4
PROJECTION_LR = 0.05
TRAIN = ["--train_projections", "true", "--projection_learning_rate", str(PROJECTION_LR)]


@pytest.fixture(scope="module")
def kv_config(tiny_model_dir, tmp_path_factory) -> Path:
    """KQ-SVD calibrated on the tiny model at rank 6, used at rank 4 on keys and values of layer 1 only."""
    root = tmp_path_factory.mktemp("calibrated")
    model, tokenizer = load_model(str(tiny_model_dir))
    folder = calibrate(model, tokenizer, out_dir=root, fit=("kqsvd",), rank=CALIBRATED_RANK,
                       value_rank=CALIBRATED_RANK, num_blocks=4, block_len=32, progress=False)
    path = root / "kv.json"
    path.write_text(json.dumps({
        "budget": 8, "sinks": 2, "recent": 2, "dense_layers": [0],
        "lowrank": {"projections": str(folder / "projections.safetensors"), "key_rank": TRAINED_RANK,
                    "value_rank": TRAINED_RANK},
    }))
    return path


def _calibrated_file(kv_config: Path) -> Path:
    return Path(json.loads(kv_config.read_text())["lowrank"]["projections"])


class RecordOptimizer(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        own = {id(p) for p in getattr(model, ATTRIBUTE).parameters()}
        self.groups = [
            {"own": sum(id(p) in own for p in g["params"]), "size": len(g["params"]), "lr": g["lr"],
             "weight_decay": g["weight_decay"], "names": [n for n, p in model.named_parameters()
                                                          if any(p is q for q in g["params"])]}
            for g in optimizer.param_groups
        ]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, kv_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    recorder = RecordOptimizer()
    main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *TINY_ARGS, "--kv_config",
          str(kv_config), "--max_steps", "2", "--save_strategy", "no", "--use_peft", "true", "--lora_r", "4",
          "--use_cpu", "true", *TRAIN], callbacks=[recorder])
    return out, recorder.groups


def test_projections_are_an_optimizer_group_of_their_own_next_to_lora(trained):
    _, groups = trained
    own = [g for g in groups if g["own"]]
    assert len(own) == 1 and own[0]["own"] == own[0]["size"] == 4  # a and b of keys and values, layer 1
    assert own[0]["lr"] == PROJECTION_LR and own[0]["weight_decay"] == 0.0
    others = [n for g in groups if not g["own"] for n in g["names"]]
    assert others and all("lora_" in n for n in others)  # PEFT froze the base weights, not the projections


def test_trained_projections_are_saved_and_used_by_load_compressed(trained, kv_config):
    out, _ = trained
    calibrated_path = _calibrated_file(kv_config)
    saved_path = out / "kv_compression" / "projections.safetensors"
    metadata = training_metadata(out)
    assert metadata["projections"] == {
        "trained": True, "calibrated_file": str(calibrated_path), "calibrated_sha256": sha256_file(calibrated_path),
    }
    with safe_open(str(calibrated_path), "pt") as a, safe_open(str(saved_path), "pt") as b:
        assert a.metadata()["fingerprint"] == b.metadata()["fingerprint"]
    calibrated = read_projections(calibrated_path, 2, 2, 8)
    saved = read_projections(saved_path, 2, 2, 8)  # the calibration format, validated
    for side in ("keys", "values"):
        before, after = getattr(calibrated, side), getattr(saved, side)
        for part in ("a", "b", "singular_values"):  # the dense layer 0 is not trained: kept as calibrated
            assert torch.equal(getattr(before[0], part), getattr(after[0], part))
        assert after[1].rank == TRAINED_RANK
        assert not torch.allclose(after[1].a, before[1].a[..., :TRAINED_RANK])
        assert not torch.allclose(after[1].b, before[1].b[..., :TRAINED_RANK])
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())  # the HF weights hold no projections

    model, tokenizer, config = load_compressed(out)
    assert config.lowrank.projections == str(saved_path)
    raw = load_file(str(saved_path))

    def pairs(suffix: str) -> list[LowRankPair]:
        return [LowRankPair(raw[f"layers.{i}.A{suffix}"][..., :TRAINED_RANK], raw[f"layers.{i}.B{suffix}"][..., :TRAINED_RANK],
                            raw[f"layers.{i}.S{suffix}"]) for i in range(2)]

    ids = torch.tensor([tokenizer(" ".join(["the quick brown fox jumps over the lazy dog"] * 4))["input_ids"][:32]])
    with torch.no_grad():
        with replay_compression(model, config, prefill_len=16):
            loaded = model(input_ids=ids).logits
        with replay_compression(model, config, prefill_len=16, projections=(pairs(""), pairs("_v"))):
            explicit = model(input_ids=ids).logits
        with replay_compression(model, config.with_artifact_paths(lambda _: str(calibrated_path)), prefill_len=16):
            with_calibrated = model(input_ids=ids).logits
    torch.testing.assert_close(loaded, explicit, rtol=0, atol=0)
    assert not torch.allclose(loaded, with_calibrated, atol=1e-4)


def test_without_the_flag_the_calibrated_file_is_bundled_byte_identical(tiny_model_dir, kv_config, tmp_path):
    main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *TINY_ARGS, "--kv_config",
          str(kv_config), "--max_steps", "1", "--save_strategy", "no", "--loyalty_blocks", "0", "--use_cpu", "true"])
    saved = tmp_path / "kv_compression" / "projections.safetensors"
    assert saved.read_bytes() == _calibrated_file(kv_config).read_bytes()
    assert training_metadata(tmp_path)["projections"] == {"trained": False}


# Full fine-tuning (the checkpoint holds full weights, which must not hold the projections), cross-entropy
# and on-policy steps (generation under the cache reads a snapshot of the projections being trained).
RESUME_RUN = TINY_ARGS + ["--max_steps", "4", "--save_steps", "2", "--ce_weight", "0.2", "--on_policy_fraction", "0.5",
                          "--loyalty_blocks", "0", "--lr_scheduler_type", "linear", *TRAIN]


@pytest.mark.slow  # three training processes, about 20 s
def test_kill_and_resume_reproduces_the_loss_curve_and_the_projections(tiny_model_dir, kv_config, tmp_path):
    def args(out: Path) -> list[str]:
        return ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), "--kv_config", str(kv_config),
                *RESUME_RUN]

    reference = run_distill(args(tmp_path / "uninterrupted"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = run_distill(args(tmp_path / "resumed"), script=KILLABLE, env={"KVTRAIN_TEST_KILL": "step:2"})
    assert killed.returncode == 17, killed.stderr[-3000:]
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / CHECKPOINT_FILE).is_file()
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if ATTRIBUTE in k]
    resumed = run_distill(args(tmp_path / "resumed") + ["--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "missing keys" not in resumed.stderr

    history = training_metadata(tmp_path / "uninterrupted")["metrics"]["log_history"]
    expected, got = step_losses(history), step_losses(training_metadata(tmp_path / "resumed")["metrics"]["log_history"])
    assert {e["on_policy"] for e in history if "on_policy" in e} == {0.0, 1.0}
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), step
    final = [load_file(str(tmp_path / run / "kv_compression" / "projections.safetensors")) for run in ("uninterrupted", "resumed")]
    for name in final[0]:
        torch.testing.assert_close(final[1][name], final[0][name], rtol=1e-5, atol=1e-7, msg=name)


def _launch(config: str, port: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate" / config),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", port]


def _two_rank_args(tiny_model_dir, kv_config, out: Path) -> list[str]:
    return ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *TINY_ARGS, "--kv_config",
            str(kv_config), "--max_steps", "2", "--save_strategy", "no", "--loyalty_blocks", "0", *TRAIN]


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, kv_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = run_distill(_two_rank_args(tiny_model_dir, kv_config, out), launcher=_launch("cpu.yaml", "29547"),
                       env={"ACCELERATE_USE_CPU": "1"}, script=RANK_DUMP)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_ddp_ranks_keep_equal_projections(ddp_run, kv_config):
    ranks = [load_file(str(ddp_run / f"rank-{i}.safetensors")) for i in (0, 1)]
    calibrated = read_projections(_calibrated_file(kv_config), 2, 2, 8)
    # Each rank trained on its own half of the batches: only all-reduced gradients keep the copies equal.
    assert sorted(ranks[0]) == ["pairs.key_1_a", "pairs.key_1_b", "pairs.value_1_a", "pairs.value_1_b"]
    for name in ranks[0]:
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0, msg=name)
    assert not torch.allclose(ranks[0]["pairs.key_1_a"], calibrated.keys[1].a[..., :TRAINED_RANK])
    saved = read_projections(ddp_run / "kv_compression" / "projections.safetensors", 2, 2, 8)
    assert torch.equal(saved.keys[1].a, ranks[0]["pairs.key_1_a"])


@pytest.mark.slow  # two DeepSpeed processes (and DeepSpeed's CPU ops, JIT-compiled on first use)
def test_zero2_trains_the_projections_as_ddp_does(ddp_run, tiny_model_dir, kv_config, tmp_path):
    pytest.importorskip("deepspeed")
    proc = run_distill(_two_rank_args(tiny_model_dir, kv_config, tmp_path), launcher=_launch("zero2.yaml", "29557"),
                       env={"DS_ACCELERATOR": "cpu"}, script=RANK_DUMP, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [step_losses(training_metadata(out)["metrics"]["log_history"], "loss") for out in (ddp_run, tmp_path)]
    assert sorted(losses[1]) == [1, 2]
    for step in (1, 2):
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-4), step
    saved = [load_file(str(out / "kv_compression" / "projections.safetensors")) for out in (ddp_run, tmp_path)]
    for name in saved[0]:
        torch.testing.assert_close(saved[1][name], saved[0][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "edit,extra,match",
    [
        (lambda c: {k: v for k, v in c.items() if k != "lowrank"}, TRAIN,
         r"train_projections=true needs low-rank projections.*lowrank\.projections"),
        (lambda c: c, ["--projection_learning_rate", "0.1"], "projection_learning_rate=0.1 is set but train_projections is false"),
        (lambda c: {**c, "lowrank": {**c["lowrank"], "keys": False, "values": False}}, TRAIN,
         "lowrank.keys and lowrank.values are both false"),
        (lambda c: {**c, "dense_layers": [0, 1]}, TRAIN, "no compressed layer uses the projections"),
    ],
    ids=["no-lowrank", "lr-without-flag", "no-side", "all-dense"],
)
def test_bad_projection_training_set_ups_fail_clearly(tiny_model_dir, kv_config, tmp_path, edit, extra, match):
    path = tmp_path / "kv.json"
    path.write_text(json.dumps(edit(json.loads(kv_config.read_text()))))
    with pytest.raises(ValueError, match=match):
        main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"), *TINY_ARGS,
              "--kv_config", str(path), "--max_steps", "1", "--use_cpu", "true", *extra])
