"""Every model option of a recipe (TRL's `ModelConfig`) reaches the loader or PEFT, or is refused by name."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trl import ModelConfig

from kvtrain.models import tiny_tokenizer, twin_model
from kvtrain.training.model_options import LOADER_FIELDS, PEFT_FIELDS, load_options
from kvtrain.training.run import build
from tests.training.conftest import REPO, TINY_ARGS, run_distill, run_env, training_metadata

TWIN = "qwen3-0.6b"


def saved_twin(folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    twin_model(TWIN, seed=seed).to(dtype).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def build_args(model: str, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--output_dir", str(out), *TINY_ARGS, "--max_steps", "1",
            "--save_strategy", "no", "--loyalty_blocks", "0", "--use_cpu", "true", *extra]


def test_every_model_option_is_placed():
    """A `ModelConfig` field that is neither loader nor PEFT input would be silently ignored."""
    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(LOADER_FIELDS) | set(PEFT_FIELDS)


def test_an_option_this_kvtrain_does_not_know_is_refused_by_name():
    @dataclasses.dataclass
    class NewerModelConfig(ModelConfig):
        use_liger_rope: bool = False

    load_options(NewerModelConfig(model_name_or_path="m"))  # left at its default: nothing to refuse
    with pytest.raises(ValueError, match=r"\['use_liger_rope'\] are set"):
        load_options(NewerModelConfig(model_name_or_path="m", use_liger_rope=True))


def test_dtype_auto_keeps_the_checkpoints_dtype(tmp_path):
    source = saved_twin(tmp_path / "bf16", dtype=torch.bfloat16)
    run = build(build_args(str(source), tmp_path / "out", "--dtype", "auto"))
    assert {p.dtype for p in run.trainer.model.parameters()} == {torch.bfloat16}
    run = build(build_args(str(source), tmp_path / "out", "--dtype", "float32"))
    assert {p.dtype for p in run.trainer.model.parameters()} == {torch.float32}


@pytest.mark.parametrize(("extra", "match"), [
    (["--attn_implementation", "eager"], r"attn_implementation='eager': kvtrain runs the model's attention itself"),
    (["--attn_implementation", "flash_attention_2"], r"attn_implementation='flash_attention_2'"),
    (["--load_in_4bit", "true", "--dtype", "bfloat16"], r"load_in_4bit: .* only be trained through LoRA; set use_peft"),
    (["--load_in_4bit", "true", "--use_peft", "true", "--dtype", "auto"], r"load_in_4bit computes in `dtype`"),
])
def test_unsupported_model_options_are_refused_by_name(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        build(build_args(str(saved_twin(tmp_path / "twin")), tmp_path / "out", *extra))


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_a_quantised_base_model_without_bitsandbytes_is_refused(tmp_path, flag):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed: the quantised LoRA path is taken instead")
    with pytest.raises(ValueError, match=r"needs bitsandbytes, which is not installed"):
        build(build_args(str(saved_twin(tmp_path / "twin")), tmp_path / "out", flag, "true", "--use_peft", "true",
                         "--dtype", "bfloat16"))


@pytest.mark.parametrize(("options", "match"), [
    (dict(lora_r=64), r"\['lora_r'\] are set but use_peft is false"),
    (dict(use_peft=True, load_in_8bit=True, bnb_4bit_quant_type="fp4"),
     r"\['bnb_4bit_quant_type'\] are set but load_in_4bit is false"),
])
def test_options_that_would_do_nothing_are_named(options, match):
    with pytest.warns(UserWarning, match=match):
        load_options(ModelConfig(model_name_or_path="m", **options))


def test_a_dtype_that_is_not_a_torch_dtype_is_refused():
    with pytest.raises(ValueError, match=r"dtype='float33' is not a torch dtype"):
        load_options(ModelConfig(model_name_or_path="m", dtype="float33"))


def test_sdpa_is_accepted(tmp_path):
    run = build(build_args(str(saved_twin(tmp_path / "twin")), tmp_path / "out", "--attn_implementation", "sdpa"))
    assert run.trainer.model.config._attn_implementation == "kvtrain"  # the full-attention path is SDPA there


@pytest.mark.parametrize("key", ["trust_remote_code", "torch_dtype"])
def test_recipe_keys_trl_does_not_have_are_refused_by_name(tmp_path, key):
    from kvtrain.training.run import parse_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: m\noutput_dir: {tmp_path}\n{key}: true\n")
    with pytest.raises(ValueError, match=rf"unknown key\(s\) \['{key}'\]"):
        parse_args(["--config", str(recipe)])


def fake_hub_cache(cache: Path) -> None:
    """A Hub cache holding two revisions of one repository: `main` (seed 1) and the tag `v2` (seed 2)."""
    repo = cache / "models--kvtrain-test--twin"
    for revision, commit, seed in (("main", "1" * 40, 1), ("v2", "2" * 40, 2)):
        saved_twin(repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)


CHECK_BASE = """
import sys, torch
from kvtrain.models import twin_model
from kvtrain.runtime.pretrained import load_compressed
model, _, _ = load_compressed(sys.argv[1])
for seed in (1, 2):
    if torch.equal(model.get_base_model().model.embed_tokens.weight, twin_model("qwen3-0.6b", seed=seed).model.embed_tokens.weight):
        print("seed", seed)
"""


def test_model_revision_is_trained_and_reloaded(tmp_path):
    """Offline Hub cache (the Hub is unreachable here): the run trains revision v2, and `load_compressed` loads
    the adapter onto v2 again, not onto `main`."""
    cache, out = tmp_path / "hub", tmp_path / "out"
    fake_hub_cache(cache)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = run_distill(build_args("kvtrain-test/twin", out, "--model_revision", "v2", "--use_peft", "true",
                                  "--lora_r", "2"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert training_metadata(out)["arguments"]["model"]["model_revision"] == "v2"
    check = subprocess.run([sys.executable, "-c", CHECK_BASE, str(out)], cwd=REPO, env={**run_env(), **env},
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split() == ["seed", "2"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "kvtrain-test/twin"
