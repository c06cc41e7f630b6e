"""The whole pipeline on a tiny twin of every model the recipes name (and of Qwen2.5's tied small size, Qwen3 and
the sliding-window Mistral): the twin carries the real model's features, no compression equals the plain model,
the cache equals replay through prefill and decode events, calibration's artifacts drive a compressed run, and
a 2-step on-policy distillation trains a LoRA adapter through train/distill.py's `main`."""

from __future__ import annotations

import json

import pytest
import torch

from kvtrain.calibrate.run import calibrate
from kvtrain.config import KVCompressionConfig, LowRankConfig, QuantConfig, ScheduleConfig, ScorerConfig
from kvtrain.models import REAL_MODELS, RECIPE_TWINS, eos_token_ids, sliding_windows, tiny_tokenizer, twin_model
from kvtrain.models.rope import rope_type
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.training.run import main
from tests.test_cache_replay import run_both
from tests.training.conftest import REPO, training_metadata

TWINS = list(REAL_MODELS)
# Within the shrunk sliding window (4096 / 128 = 32) of the Mistral-7B-v0.1 twin, which is honoured there.
SEQ, PREFILL, INTERVAL = 32, 16, 4


def test_the_recipes_models_all_have_twins():
    from kvtrain.training.recipe import load_recipe
    from kvtrain.training.run import ARGUMENT_TYPES

    recipes = (REPO / "recipes").glob("*/distill/*.yaml")
    named = {load_recipe(path, ARGUMENT_TYPES)["model_name_or_path"] for path in recipes}
    twinned = {REAL_MODELS[RECIPE_TWINS[folder]].hub_id for folder in RECIPE_TWINS}
    assert named - {"smollm2-135m"} == twinned


@pytest.fixture(scope="module")
def twins():
    return {}


def get(twins, name):
    if name not in twins:
        twins[name] = twin_model(name, seed=2)
    return twins[name]


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 128, (1, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TWINS)
def test_twin_carries_the_real_models_features(twins, name):
    model, real = get(twins, name), REAL_MODELS[name].config
    attn = model.model.layers[0].self_attn
    assert model.config.vocab_size == real["vocab_size"]
    assert eos_token_ids(model) == list(dict.fromkeys(REAL_MODELS[name].generation_eos + tuple(
        [real["eos_token_id"]] if isinstance(real["eos_token_id"], int) else real["eos_token_id"])))
    scaling = (real.get("rope_scaling") or {}).get("rope_type", "default")
    assert rope_type(model.config) == scaling == model.model.rotary_emb.rope_type
    assert model.config.num_attention_heads // model.config.num_key_value_heads == (
        real["num_attention_heads"] // real["num_key_value_heads"])
    assert (attn.q_proj.bias is not None) == (attn.k_proj.bias is not None) == (real["model_type"] == "qwen2")
    assert hasattr(attn, "q_norm") == hasattr(attn, "k_norm") == (real["model_type"] == "qwen3")
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == real["tie_word_embeddings"]
    window = real.get("sliding_window") if real["model_type"] == "mistral" else None
    assert sliding_windows(model.config) == [window and window // 128] * 2


@pytest.mark.parametrize("name", TWINS)
def test_no_compression_equals_the_plain_model(twins, name):
    model = get(twins, name)
    config = KVCompressionConfig(budget=SEQ, sinks=0, recent=0, schedule=ScheduleConfig(interval=INTERVAL))
    decoded = teacher_forced_decode(model, CompressedCache.for_model(model, config), tokens(), prefill_len=PREFILL)
    with torch.no_grad():
        plain = model(input_ids=tokens()).logits
    torch.testing.assert_close(decoded, plain, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scorer", ["expected_attention", "gkv"])
@pytest.mark.parametrize("name", TWINS)
def test_cache_equals_replay_through_decode_events(twins, name, scorer):
    model = get(twins, name)
    config = KVCompressionConfig(budget=8, sinks=2, recent=2, query_window=INTERVAL, scorer=ScorerConfig(scorer),
                                 schedule=ScheduleConfig(interval=INTERVAL))
    cache, decoded, replay, replayed = run_both(model, config, tokens(), prefill_len=PREFILL)
    torch.testing.assert_close(replayed, decoded, rtol=0, atol=1e-4)
    for layer_cache, layer_replay in zip(cache.records, replay.records):
        assert [r.tokens_seen for r in layer_cache][:4] == [r.tokens_seen for r in layer_replay] == [16, 20, 24, 28]
        assert all(torch.equal(a.kept, b.kept) for a, b in zip(layer_cache, layer_replay))
    with torch.no_grad():
        plain = model(input_ids=tokens()).logits
    assert (decoded[:, PREFILL:] - plain[:, PREFILL:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", TWINS)
def test_calibrated_artifacts_drive_a_compressed_run(twins, name, tmp_path):
    """KQ-SVD projections, a TaDA plan and Expected Attention statistics calibrated on the twin, then all three
    in one config: cache equals replay."""
    model = get(twins, name)
    folder = calibrate(model, tiny_tokenizer(), out_dir=tmp_path, fit=("kqsvd", "tada", "query-stats"),
                       num_blocks=3, block_len=SEQ, rank=8, value_rank=8, tada_blocks=1, tada_group_size=8,
                       tada_residual_length=INTERVAL, progress=False)
    config = KVCompressionConfig(
        budget=8, sinks=2, recent=2, query_window=INTERVAL, selection="per_layer",
        scorer=ScorerConfig("expected_attention", {"stats": str(folder / "query_stats.safetensors")}),
        lowrank=LowRankConfig(str(folder / "projections.safetensors")),
        quant=QuantConfig(group_size=8, plan=str(folder / "quant_plan.json")),
        schedule=ScheduleConfig(interval=INTERVAL),
    )
    _, decoded, _, replayed = run_both(model, config, tokens(), prefill_len=PREFILL)
    torch.testing.assert_close(replayed, decoded, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", TWINS)
def test_two_step_on_policy_distillation(name, tmp_path):
    source = tmp_path / "twin"
    twin_model(name, seed=2).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    main(["--model_name_or_path", str(source), "--output_dir", str(out), "--dtype", "auto",
          "--block_len", str(SEQ), "--prefill_len", str(PREFILL), "--max_blocks", "2", "--max_steps", "2",
          "--kv_budget", "8", "--kv_sinks", "2", "--kv_recent", "2", "--kv_window", "4", "--kv_interval", "4",
          "--per_device_train_batch_size", "1", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
          "--learning_rate", "1e-2", "--loyalty_blocks", "1", "--use_peft", "true", "--lora_r", "4",
          "--lora_target_modules", "q_proj", "v_proj", "--on_policy_fraction", "1.0", "--use_cpu", "true"])
    metadata = training_metadata(out)
    steps = [e for e in metadata["metrics"]["log_history"] if "distill_loss" in e]
    assert [e["step"] for e in steps] == [1, 2] and all(e["on_policy"] == 1.0 for e in steps)
    assert all(torch.isfinite(torch.tensor(e["distill_loss"])) for e in steps)
    assert set(metadata["metrics"]["loyalty"]) == {"before", "after"}
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
