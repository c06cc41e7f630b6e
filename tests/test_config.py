"""KVCompressionConfig: round trips, per-layer resolution, and errors that name the field and value."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from kvtrain.arguments import KVCompressionArguments
from kvtrain.config import ConfigError, KVCompressionConfig, MergeConfig, ScheduleConfig, ScorerConfig
from kvtrain.models import tiny_model
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode


def rich_config() -> KVCompressionConfig:
    return KVCompressionConfig(
        budget=64,
        sinks=2,
        recent=8,
        scorer=ScorerConfig("gkv", {"alpha": 0.9, "mix_lambda": 0.4}),
        selection="head_adaptive",
        layer_budgets="pyramid",
        whitelist=[(3, 9)],
        fair_spans=[(0, 10), (10, 30)],
        merge=MergeConfig(threshold=0.7),
        schedule=ScheduleConfig(interval=32, prefill_chunk=128),
        dense_layers=[0],
        layers={2: {"budget": 32, "scorer": {"name": "snapkv", "params": {}}}},
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    config = rich_config()
    path = tmp_path / f"c{suffix}"
    config.save(path)
    assert KVCompressionConfig.load(path).to_dict() == config.to_dict()


def test_layer_policy_applies_dense_layers_budgets_and_overrides():
    config = rich_config()
    assert config.layer_policy(0, 4) is None
    budgets = [config.layer_policy(i, 4).budget for i in (1, 3)]
    assert budgets[0] > budgets[1]  # pyramid: lower layers keep more
    layer2 = config.layer_policy(2, 4)
    assert layer2.budget == 32 and layer2.scorer.name == "snapkv"


def test_ratio_budget_grows_with_tokens_seen():
    policy = KVCompressionConfig(budget=None, compression_ratio=0.75, sinks=4, recent=4).layer_policy(0, 1)
    assert policy.budget_at(400) == 100
    assert policy.budget_at(10) == 8  # never below the protected tokens


@pytest.mark.parametrize(
    "data, field",
    [
        ({"budgett": 5}, "budgett"),
        ({"budget": 0}, "budget"),
        ({"budget": 10, "compression_ratio": 0.5}, "budget"),
        ({"compression_ratio": 1.5, "budget": None}, "compression_ratio"),
        ({"selection": "random"}, "selection"),
        ({"scorer": {"name": "nope"}}, "scorer.name"),
        ({"scorer": {"name": "gkv", "params": {"beta": 1}}}, "scorer.params"),
        ({"schedule": {"interval": 0}}, "schedule.interval"),
        ({"schedule": {"every": 3}}, "schedule.every"),
        ({"whitelist": [[5, 2]]}, "whitelist"),
        ({"layers": {"1": {"colour": 1}}}, "layers.1"),
        ({"budget": 8, "sinks": 4, "recent": 8}, "budget"),
    ],
)
def test_invalid_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        KVCompressionConfig.from_dict(data)


def test_corrupt_file_names_file_and_field(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"budget": 32, "scorer": {"name": "snapkv", "params": {"kernel_size": 5, "wat": 1}}}))
    with pytest.raises(ConfigError, match=r"broken\.json.*scorer\.params.*wat"):
        KVCompressionConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        KVCompressionConfig.load(path)
    with pytest.raises(ConfigError, match="missing.yaml"):
        KVCompressionConfig.load(tmp_path / "missing.yaml")


def test_arguments_override_a_config_file(tmp_path, caplog):
    path = tmp_path / "base.yaml"
    rich_config().save(path)
    args = KVCompressionArguments(kv_config=str(path), kv_ratio=0.5, kv_param=["alpha=0.7"], kv_interval=16)
    with caplog.at_level("WARNING", logger="kvtrain"):
        config = args.to_config()
    assert f"{path} overridden by kv_param, kv_ratio, kv_interval" in caplog.text
    assert config.budget is None and config.compression_ratio == 0.5
    assert config.scorer.params == {"alpha": 0.7, "mix_lambda": 0.4}
    assert config.schedule.interval == 16 and config.schedule.prefill_chunk == 128
    with pytest.raises(ConfigError, match="kv_param 'alpha'"):
        KVCompressionArguments(kv_param=["alpha"]).to_config()


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="gpt2"):
        CompressedCache.for_model(model, KVCompressionConfig(budget=32))


def test_budget_above_context_compresses_nothing_and_says_so_once(caplog):
    model = tiny_model("llama", num_layers=3, vocab_size=50, seed=0)
    config = KVCompressionConfig(budget=497, scorer=ScorerConfig("snapkv"))  # a message unique to this test
    ids = torch.randint(0, 50, (1, 30))
    with caplog.at_level(logging.WARNING, logger="kvtrain"):
        for _ in range(2):
            cache = CompressedCache.for_model(model, config)
            teacher_forced_decode(model, cache, ids, prefill_len=20)
            assert all(int(n.min()) == 30 for n in cache.stored_tokens())
    assert sum("budget 497 >= the 20 tokens seen" in r.message for r in caplog.records) == 1


def test_h2o_with_a_window_shorter_than_the_interval_warns_naming_both_fields(tmp_path):
    fields = dict(scorer=ScorerConfig("h2o"), query_window=16, schedule=ScheduleConfig(interval=128))
    with pytest.warns(UserWarning, match=r"config: scorer 'h2o' .* query_window=16 < schedule.interval=128: the 112"):
        KVCompressionConfig(**fields)
    path = tmp_path / "h2o.json"
    path.write_text(json.dumps({"scorer": {"name": "h2o"}, "query_window": 8, "schedule": {"interval": 8},
                                "layers": {"1": {"query_window": 4}}}))
    with pytest.warns(UserWarning, match=rf"{path}: scorer 'h2o' .* layers.1.query_window=4 < schedule.interval=8"):
        KVCompressionConfig.load(path)


@pytest.mark.parametrize("fields", [
    dict(scorer=ScorerConfig("h2o"), query_window=128, schedule=ScheduleConfig(interval=128)),
    dict(scorer=ScorerConfig("snapkv"), query_window=16, schedule=ScheduleConfig(interval=128)),
    dict(query_window=16, schedule=ScheduleConfig(interval=128), layers={0: {"scorer": {"name": "h2o"}, "query_window": 128}}),
])
def test_no_warning_when_every_decoded_query_is_counted_or_not_needed(fields):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KVCompressionConfig(**fields)
