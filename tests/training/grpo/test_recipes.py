"""GRPO recipes parse into the four argument dataclasses without loading a model, and bad recipes fail clearly."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import pytest
import yaml

from kvtrain.training.grpo.rewards import REWARDS
from kvtrain.training.grpo.run import ARGUMENT_TYPES, parse_args
from kvtrain.training.grpo.tasks import TASKS

REPO = Path(__file__).resolve().parents[3]
RECIPES = sorted((REPO / "recipes").glob("*/grpo/*.yaml"))
HUB_IDS = {"qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct", "smollm2-135m": "smollm2-135m"}
CPU_OVERRIDES = ["--bf16", "false", "--use_cpu", "true"]  # this machine has no GPU


def _value(parsed, key):
    for obj in parsed:
        if hasattr(obj, key):
            value = getattr(obj, key)
            return value.value if isinstance(value, enum.Enum) else value
    raise AssertionError(f"{key} landed in no dataclass")


def test_a_small_and_a_7b_model_have_grpo_recipes():
    assert {p.parts[-3] for p in RECIPES} == set(HUB_IDS)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parts[-3]}-{p.stem}")
def test_recipe_keys_land_unchanged(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    raw = yaml.safe_load(recipe.read_text())
    parsed = parse_args(["--config", str(recipe), *CPU_OVERRIDES, "--output_dir", str(tmp_path)])
    for key, expected in raw.items():
        if key in ("bf16", "output_dir"):
            continue
        got = _value(parsed, key)
        if key == "report_to":
            expected = [] if expected == "none" else [expected]
        assert got == expected, f"{recipe.name}: {key} = {got!r}, recipe says {expected!r}"
    task, kv, config, model = parsed
    assert model.model_name_or_path == HUB_IDS[recipe.parts[-3]] and model.use_peft
    assert task.task in TASKS or task.task == "gsm8k"
    assert set(task.rewards) <= set(REWARDS)
    compression = kv.to_config()
    assert compression.scorer.name == raw["kv_scorer"] and compression.budget == raw["kv_budget"]
    # Rollouts evict inside the completion: an event every `interval` decode steps, more than once per answer.
    assert compression.schedule.interval < config.max_completion_length
    assert config.disable_dropout or model.lora_dropout == 0.0  # the trained forward must be the sampling one


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_recipe_key_is_named(tmp_path):
    path = _write(tmp_path, "model_name_or_path: x\nkv_budget: 12\nrollout_cahce: full\n")
    with pytest.raises(ValueError, match=r"recipe .*recipe.yaml: unknown key\(s\) \['rollout_cahce'\]"):
        parse_args(["--config", path])


@pytest.mark.parametrize("text,match", [
    ("rollout_cache: sparse\n", "rollout_cache='sparse'"),
    ("reference_cache: none\n", "reference_cache='none'"),
    ("task_param: [filler]\n", "task_param 'filler': expected KEY=VALUE"),
    ("task: gsm8k\n", "task=gsm8k needs dataset_name"),
    ("num_iterations: two\n", "num_iterations='two' is not an integer"),
])
def test_bad_values_name_the_field(tmp_path, text, match):
    path = _write(tmp_path, f"model_name_or_path: x\noutput_dir: {tmp_path}\nbf16: false\nuse_cpu: true\n{text}")
    with pytest.raises(ValueError, match=match):
        parse_args(["--config", path])


def test_argument_types_have_no_shared_field_names():
    names = [f.name for cls in ARGUMENT_TYPES for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
