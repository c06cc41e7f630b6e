"""train/grpo.py end to end on a tiny model: two CPU processes through `accelerate launch`, exact replay of the
rollouts (against the full-attention gap on the same rollouts), real old log-probs when a generation is reused,
the output loading in one call, and bad input named clearly."""

from __future__ import annotations

import math

import pytest
import torch

from kvtrain.runtime.pretrained import load_compressed
from kvtrain.training.grpo.rewards import RewardError, UnknownRewardError, register_reward
from kvtrain.training.grpo.run import main
from tests.training.conftest import training_metadata
from tests.training.grpo.conftest import ACCELERATE_CPU, TINY_GRPO, run_grpo, step_metric


@pytest.fixture(scope="module")
def ddp_output(tiny_model_dir, tmp_path_factory):
    """Two ranks, LoRA, two updates per generation (num_iterations 2): step 1 is fresh, step 2 reuses its batch."""
    out = tmp_path_factory.mktemp("grpo-ddp")
    args = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out), *TINY_GRPO,
            "--max_steps", "2", "--num_iterations", "2", "--save_strategy", "no",
            "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "k_proj", "v_proj"]
    proc = run_grpo(args, launcher=ACCELERATE_CPU + ["--main_process_port", "29561"], env={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_two_processes_train_on_exact_replays_and_load(ddp_output):
    metadata = training_metadata(ddp_output)
    history = metadata["metrics"]["log_history"]
    assert metadata["trainer"] == "grpo" and metadata["rollout_cache"] == "compressed"
    # An epoch is 16 prompts x 4 generations x 2 iterations = 128 completions; a step takes 4 per rank, so two
    # ranks make an epoch of 16 steps (one process alone: 32).
    assert step_metric(history, "epoch") == {1: 0.0625, 2: 0.125}
    losses = step_metric(history, "loss")
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert any(v != 0.0 for v in losses.values())  # the reward varies within groups: a real policy gradient
    # Step 1 trains on rollouts sampled by its own weights: the replayed log-probs are the sampler's.
    replay, naive = step_metric(history, "logp_gap/replay"), step_metric(history, "logp_gap/full_attention")
    assert list(replay) == [1] and list(naive) == [1]
    assert replay[1] <= 1e-3 and naive[1] >= 10 * max(replay[1], 1e-6)
    # Old log-probs are the replay of the rollout with the sampling weights: equal on the fresh step, and not
    # equal once one update has moved the weights (the importance ratio is not identically 1).
    ratio = step_metric(history, "importance/abs_log_ratio")
    assert ratio[1] <= 1e-6 and ratio[2] > 1e-3

    model, tokenizer, config = load_compressed(ddp_output)
    assert type(model).__name__ == "PeftModelForCausalLM" and metadata["format"] == "adapter"
    assert config.scorer.name == "gkv" and config.budget == 8 and config.schedule.interval == 4
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # trained: LoRA starts with B = 0


def test_full_cache_rollouts_train_without_replay(tiny_model_dir, tmp_path):
    """RL-Full: rollouts with the full cache, the training forward with full attention, no keep-sets carried."""
    main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *TINY_GRPO, "--max_steps", "1",
          "--save_strategy", "no", "--rollout_cache", "full", "--use_cpu", "true"])
    metadata = training_metadata(tmp_path)
    assert metadata["rollout_cache"] == "full"
    history = metadata["metrics"]["log_history"]
    assert "logp_gap/replay" not in history[0]
    assert history[0]["logp_gap/full_attention"] <= 1e-3  # full cache and full attention: the same computation


def test_kl_reference_under_compression_and_full_cache(tiny_model_dir, tmp_path):
    """beta > 0: the reference is the adapter-disabled policy; 'compressed' replays the rollout's keep-sets for it,
    'full' runs it with full attention. At step 1 the LoRA is still the identity, so the compressed reference
    equals the policy (KL 0) and the full-attention one does not."""
    kl = {}
    for cache in ("compressed", "full"):
        main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / cache), *TINY_GRPO,
              "--max_steps", "1", "--save_strategy", "no", "--use_cpu", "true", "--beta", "0.1",
              "--reference_cache", cache, "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"])
        kl[cache] = training_metadata(tmp_path / cache)["metrics"]["log_history"][0]["kl"]
    assert kl["compressed"] <= 1e-6 and kl["full"] > 1e-4


def test_unknown_reward_is_named_before_the_model_loads(tmp_path):
    with pytest.raises(UnknownRewardError, match=r"unknown reward\(s\) \['acuracy'\]; registered rewards: .*task"):
        main(["--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path), "--rewards", "acuracy",
              "--bf16", "false", "--use_cpu", "true"])


@register_reward("nan_on_second")
def _nan_on_second():
    return lambda completions, **_: [float("nan") if i == 1 else 0.5 for i in range(len(completions))]


@register_reward("raises")
def _raises():
    def reward(completions, **_):
        raise KeyError("answer")

    return reward


@pytest.mark.parametrize("reward,match", [
    ("nan_on_second", r"reward 'nan_on_second' returned nan for completion 1"),
    ("raises", r"reward 'raises' raised KeyError: 'answer' on completion 0"),
])
def test_a_broken_reward_stops_training_naming_it(tiny_model_dir, tmp_path, reward, match):
    with pytest.raises(RewardError, match=match):
        main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *TINY_GRPO,
              "--rewards", reward, "--max_steps", "1", "--save_strategy", "no", "--use_cpu", "true"])


@pytest.mark.parametrize("extra,match", [
    (["--beta", "0.1"], r"beta=0.1: .* needs use_peft: true"),
    (["--cache_implementation", "static"], r"cache_implementation='static'"),
    (["--rollout_cache", "sparse"], r"rollout_cache='sparse' must be one of \('compressed', 'full'\)"),
    (["--task", "sorting"], r"unknown task 'sorting'; built-in tasks: arithmetic, copy, format, passkey"),
    (["--prompt_format", "chat"], r"prompt_format=chat, but the tokenizer has no chat template"),
])
def test_unsupported_options_fail_clearly(tiny_model_dir, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        main(["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), *TINY_GRPO, *extra,
              "--max_steps", "1", "--use_cpu", "true"])


def test_recorded_keep_sets_travel_with_shuffled_and_split_rows():
    """TRL shuffles the generation batch and splits it into micro-batches: every slice still holds, row by row,
    the keep-sets its rows were sampled with."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    from kvtrain.runtime.compressor import EventRecord
    from kvtrain.training.grpo.rollouts import KeepSetBatch

    gen = torch.Generator().manual_seed(0)
    records = [[EventRecord(10, torch.randint(0, 10, (6, 2, 5), generator=gen)),
                EventRecord(14, torch.randint(0, 14, (6, 2, 7), generator=gen))], []]
    batch = {"row": torch.arange(6), **KeepSetBatch.from_records(records, 6).fields()}
    torch.manual_seed(1)
    for part in split_tensor_dict(shuffle_sequence_dict(batch), 3):
        got = KeepSetBatch.from_fields(part).records()
        assert [r.tokens_seen for r in got[0]] == [10, 14] and got[1] == []
        for mine, original in zip(got[0], records[0]):
            assert torch.equal(mine.kept, original.kept[part["row"]])
