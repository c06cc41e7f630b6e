"""Recipes parse into the four argument dataclasses without loading a model, and bad recipes fail clearly."""

from __future__ import annotations

import enum
from pathlib import Path

import pytest
import yaml

from kvtrain.config import KVCompressionConfig
from kvtrain.training.run import ARGUMENT_TYPES, parse_args

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*/distill/*.yaml"))
HUB_IDS = {
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "smollm2-135m": "smollm2-135m",
}
# This machine has no GPU: a recipe's bf16 is overridden on the command line (which also tests overriding).
CPU_OVERRIDES = ["--bf16", "false"]


def _value(parsed, key):
    for obj in parsed:
        if hasattr(obj, key):
            value = getattr(obj, key)
            return value.value if isinstance(value, enum.Enum) else value
    raise AssertionError(f"{key} landed in no dataclass")


def test_every_model_has_a_recipe():
    assert {p.parts[-3] for p in RECIPES} == set(HUB_IDS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parts[-3])
def test_recipe_keys_land_unchanged(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes are run from the repository root, where their kv_config paths start
    raw = yaml.safe_load(recipe.read_text())
    parsed = parse_args(["--config", str(recipe), *CPU_OVERRIDES, "--output_dir", str(tmp_path)])
    for key, expected in raw.items():
        if key in ("bf16", "output_dir"):
            continue
        got = _value(parsed, key)
        if key == "report_to":
            expected = [] if expected == "none" else [expected]
        assert got == expected, f"{recipe.name}: {key} = {got!r}, recipe says {expected!r}"
    distill, kv, training, model = parsed
    assert model.model_name_or_path == HUB_IDS[recipe.parts[-3]]
    config = kv.to_config()
    if "kv_config" in raw:
        assert config == KVCompressionConfig.load(REPO / raw["kv_config"])
    else:
        assert config.scorer.name == raw["kv_scorer"] and config.budget == raw["kv_budget"]
    assert distill.prefill_len < distill.block_len and model.use_peft


def test_kqsvd_recipe_trains_rank16_projections_without_eviction(monkeypatch):
    monkeypatch.chdir(REPO)
    distill, kv, _, model = parse_args(["--config", str(REPO / "recipes/smollm2-135m/distill/kqsvd.yaml")])
    config = kv.to_config()
    assert distill.train_projections and model.use_peft
    assert (config.lowrank.key_rank, config.lowrank.value_rank, config.lowrank.keys, config.lowrank.values) == (16, 16, True, True)
    assert config.budget is None and config.compression_ratio == 0.0


def test_cli_overrides_recipe(tmp_path):
    recipe = REPO / "recipes/smollm2-135m/distill/gkv.yaml"
    distill, kv, training, _ = parse_args(
        ["--config", str(recipe), "--kv_budget", "64", "--loss", "jsd", "--beta", "0.25", "--output_dir", str(tmp_path)]
    )
    assert kv.to_config().budget == 64 and distill.loss == "jsd" and distill.beta == 0.25
    assert training.output_dir == str(tmp_path)


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_recipe_key_is_named(tmp_path):
    path = _write(tmp_path, "model_name_or_path: x\nkv_budgett: 12\nblock_len: 64\nprefill_len: 32\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kv_budgett'\]"):
        parse_args(["--config", path])


def test_yaml_exponent_string_becomes_a_number(tmp_path):
    # YAML 1.1 reads 1e-5 as the string "1e-5"; TrlParser alone would hand the string to TrainingArguments.
    path = _write(tmp_path, f"model_name_or_path: x\nlearning_rate: 1e-5\noutput_dir: {tmp_path}\n")
    _, _, training, _ = parse_args(["--config", path])
    assert training.learning_rate == 1e-5 and isinstance(training.learning_rate, float)


@pytest.mark.parametrize(
    "text,match",
    [
        ("learning_rate: fast\n", "learning_rate='fast' is not a number"),
        ("use_peft: maybe\n", "use_peft='maybe' must be true or false"),
        ("prefill_len: 600\n", "prefill_len=600"),
        ("block_stride: 0\n", "block_stride=0"),
        ("loss: kl\n", "divergence='kl'"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, match):
    path = _write(tmp_path, f"model_name_or_path: x\noutput_dir: {tmp_path}\n{text}")
    with pytest.raises(ValueError, match=match):
        parse_args(["--config", path])


def test_argument_types_have_no_shared_field_names():
    import dataclasses

    names = [f.name for cls in ARGUMENT_TYPES for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
