"""Bad inputs across the entry points: each ends with one clear line naming what is wrong, exit code 2 (a user
error), no stack trace, nothing written, and, unless the error can only show during the work (`DURING_WORK`), no
weights loaded and no progress bar before it: inputs are checked first. A usage error from argparse prints its
usage block before that line, as argparse does. The `kvtrain` command, train/distill.py and train/grpo.py run
in-process under their own error boundary, on a tiny model saved like a Hub checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvtrain.cli import main as kvtrain_main
from kvtrain.errors import run_entry_point
from kvtrain.io import LOCK_FILE
from kvtrain.models import tiny_model, tiny_tokenizer
from kvtrain.training.grpo.rewards import register_reward
from kvtrain.training.grpo.run import main as grpo_main
from kvtrain.training.run import main as distill_main

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2-135m" / "distill" / "gkv.yaml"
GRPO_RECIPE = REPO / "recipes" / "smollm2-135m" / "grpo" / "passkey.yaml"


@register_reward("bad_inputs_raises")
def _raising_reward():
    def reward(completions, **_):
        raise KeyError("answer")

    return reward


@register_reward("bad_inputs_nan")
def _nan_reward():
    return lambda completions, **_: [float("nan")] * len(completions)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, head_dim 8, 1024 positions) and the offline tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-bad-inputs")
    model = tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    model.config.max_position_embeddings = 1024
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Files the cases point at: a plain file (as a folder in the way), broken and foreign configs."""
    folder = tmp_path_factory.mktemp("bad-input-files")
    written = {
        "a_file": "x",
        "broken.yaml": "budget: [unclosed",
        "unknown_field.yaml": "budget: 32\nwat: 1\n",
        "bool_budget.yaml": "budget: true\n",
        "dense7.yaml": "budget: 32\ndense_layers: [7]\n",
        "layer5.yaml": "budget: 32\nlayers: {5: {budget: 8}}\n",
        "neg_layer_budget.yaml": "budget: 32\nlayers: {0: {budget: -3}}\n",
        "nosuch_budgets.yaml": "budget: 32\nlayer_budgets: nosuch.json\n",
        "missing_projections.yaml": "budget: 32\nlowrank: {projections: /nonexistent/projections.safetensors}\n",
        "group7.yaml": "compression_ratio: 0\nquant: {key_bits: 4, value_bits: 4, group_size: 7}\n",
        "quant_per_head.yaml": "budget: 32\nquant: {value_bits: 4}\n",
        "merge_quant.yaml": "budget: 32\nselection: per_layer\nmerge: {}\nquant: {value_bits: 4}\n",
        "sals_no_basis.yaml": "compression_ratio: 0\nsals: {rank: 4, top_k: 8}\n",
        "param_type.yaml": "budget: 32\nscorer: {name: snapkv, params: {window: sixteen}}\n",
        "truncated.safetensors": "",
        "truncated_projections.yaml": "budget: 32\nlowrank: {projections: TRUNCATED}\n",
        "unknown_key_recipe.yaml": "model_name_or_path: x\nnot_a_field: 1\n",
        "grpo_unknown_key_recipe.yaml": "model_name_or_path: x\nrewards: [task]\nrollout_cahce: full\n",
        "bad_lr_recipe.yaml": "model_name_or_path: x\nlearning_rate: fast\n",
        "progress.json": "{not json",
    }
    paths = {}
    for name, text in written.items():
        paths[name] = folder / name
        paths[name].write_text(text.replace("TRUNCATED", str(folder / "truncated.safetensors")))
    (folder / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    return paths


def kvtrain_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = kvtrain_main(argv)
    except SystemExit as exit_:  # argparse: usage error
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out + out.err


def distill(argv: list[str], capsys) -> tuple[int, str]:
    code = run_entry_point(lambda: distill_main(argv), prog="train/distill.py", debug=False)
    out = capsys.readouterr()
    return code, out.out + out.err


def grpo(argv: list[str], capsys) -> tuple[int, str]:
    code = run_entry_point(lambda: grpo_main(argv), prog="train/grpo.py", debug=False)
    out = capsys.readouterr()
    return code, out.out + out.err


def generate(model_dir, *extra):
    return ["generate", "--model", str(model_dir), "--prompt", "Python decorators", "--max-new-tokens", "4",
            "--no-chat", *extra]


def distill_args(model_dir, tmp_path, *extra):
    return ["--config", str(RECIPE), "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"),
            "--block_len", "32", "--prefill_len", "16", "--max_blocks", "4", "--loyalty_blocks", "0",
            "--report_to", "none", "--use_peft", "false", "--kv_budget", "8", "--kv_sinks", "2", "--kv_recent", "2",
            "--kv_window", "4", "--kv_interval", "4", *extra]


def grpo_args(model_dir, tmp_path, *extra):
    return ["--config", str(GRPO_RECIPE), "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"),
            "--prompt_format", "plain", "--use_peft", "false", "--train_items", "8", "--task_param", "filler=1",
            "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
            "--max_steps", "1", "--save_strategy", "no", "--use_cpu", "true", "--kv_budget", "8", "--kv_sinks", "2",
            "--kv_recent", "2", "--kv_window", "4", "--kv_interval", "4", *extra]


# (id, entry point, argv(model_dir, files, tmp_path), text the message must contain)
CASES = [
    ("generate-empty-prompt", "cli", lambda m, f, t: ["generate", "--model", str(m), "--prompt", "  "], "--prompt is empty"),
    ("model-path-typo", "cli", lambda m, f, t: generate("/nonexistent/model"), "/nonexistent/model: no such directory"),
    ("model-invalid-id", "cli", lambda m, f, t: generate("bad id!!"), "valid Hub id"),
    ("model-hub-offline", "cli", lambda m, f, t: generate("someorg/somemodel"), "someorg/somemodel"),
    ("model-is-a-file", "cli", lambda m, f, t: generate(f["a_file"]), "not a directory"),
    ("negative-budget", "cli", lambda m, f, t: generate(m, "--kv-budget", "-3"), "'budget' = -3"),
    ("unknown-scorer", "cli", lambda m, f, t: generate(m, "--kv-scorer", "nosuch"), "unknown scorer"),
    ("scorer-param-type", "cli", lambda m, f, t: generate(m, "--kv-scorer", "snapkv", "--kv-param", "window=x"),
     "scorer.params.window"),
    ("unknown-scorer-param", "cli", lambda m, f, t: generate(m, "--kv-param", "nosuch=1"), "nosuch"),
    ("kv-param-syntax", "cli", lambda m, f, t: generate(m, "--kv-param", "window"), "expected KEY=VALUE"),
    ("missing-config", "cli", lambda m, f, t: generate(m, "--kv-config", "/nonexistent/c.yaml"), "/nonexistent/c.yaml"),
    ("broken-yaml", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["broken.yaml"])), "not valid YAML"),
    ("unknown-field", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["unknown_field.yaml"])), "wat"),
    ("bool-budget", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["bool_budget.yaml"])), "'budget' = True"),
    ("dense-layer-out-of-range", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["dense7.yaml"])), "dense_layers"),
    ("override-layer-out-of-range", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["layer5.yaml"])),
     "layers the model does not have"),
    ("override-negative-budget", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["neg_layer_budget.yaml"])),
     "layers.0.budget"),
    ("missing-layer-budgets", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["nosuch_budgets.yaml"])),
     "nosuch.json"),
    ("missing-projections", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["missing_projections.yaml"])),
     "/nonexistent/projections.safetensors"),
    ("truncated-safetensors", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["truncated_projections.yaml"])),
     "truncated.safetensors"),
    ("group-size-not-dividing", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["group7.yaml"])),
     "group size 7"),
    ("quant-needs-per-layer", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["quant_per_head.yaml"])),
     "per_layer"),
    ("merge-with-quant", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["merge_quant.yaml"])),
     "merging cannot be combined"),
    ("sals-without-basis", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["sals_no_basis.yaml"])), "sals.basis"),
    ("param-type-in-file", "cli", lambda m, f, t: generate(m, "--kv-config", str(f["param_type.yaml"])),
     "scorer.params.window"),
    ("max-new-tokens-zero", "cli", lambda m, f, t: generate(m, "--max-new-tokens", "0"), "--max-new-tokens"),
    ("generate-beyond-positions", "cli", lambda m, f, t: generate(m, "--max-new-tokens", "2000"),
     "max_position_embeddings = 1024"),
    ("loyalty-out-under-a-file", "cli", lambda m, f, t: ["eval", "loyalty", "--model", str(m), "--out",
                                                         str(f["a_file"] / "r.json")], "is a file"),
    ("loyalty-samples-zero", "cli", lambda m, f, t: ["eval", "loyalty", "--model", str(m), "--samples", "0"],
     "--samples"),
    ("loyalty-context-beyond-positions", "cli", lambda m, f, t: ["eval", "loyalty", "--model", str(m),
                                                                 "--context-len", "2000"], "max_position_embeddings"),
    ("loyalty-missing-data", "cli", lambda m, f, t: ["eval", "loyalty", "--model", str(m), "--data",
                                                     "/nonexistent/text.txt", "--split", "train"], "/nonexistent/text.txt"),
    ("loyalty-unknown-split", "cli", lambda m, f, t: ["eval", "loyalty", "--model", str(m), "--split", "nosuch"],
     "nosuch"),
    ("fidelity-out-under-a-file", "cli", lambda m, f, t: ["eval", "fidelity", "--model", str(m), "--key-bits", "4",
                                                          "--out", str(f["a_file"] / "r.json")], "is a file"),
    ("fidelity-no-variant", "cli", lambda m, f, t: ["eval", "fidelity", "--model", str(m)], "--artifacts"),
    ("fidelity-not-a-calibration", "cli", lambda m, f, t: ["eval", "fidelity", "--model", str(m), "--artifacts",
                                                           str(t)], "not a calibration output"),
    ("calibrate-out-under-a-file", "cli", lambda m, f, t: ["calibrate", "--model", str(m), "--out",
                                                           str(f["a_file"] / "calib")], "is a file"),
    ("calibrate-unknown-fit", "cli", lambda m, f, t: ["calibrate", "--model", str(m), "--out", str(t / "c"), "--fit",
                                                      "nosuch"], "--fit"),
    ("calibrate-zero-blocks", "cli", lambda m, f, t: ["calibrate", "--model", str(m), "--out", str(t / "c"),
                                                      "--num-blocks", "0"], "num_blocks=0"),
    ("quickstart-out-under-a-file", "cli", lambda m, f, t: ["quickstart", "--out", str(f["a_file"] / "q")], "is a file"),
    ("quickstart-zero-steps", "cli", lambda m, f, t: ["quickstart", "--steps", "0"], "--steps"),
    ("prepare-unknown-model", "cli", lambda m, f, t: ["prepare-model", "nosuch"], "nosuch"),
    ("recipe-missing", "distill", lambda m, f, t: ["--config", "/nonexistent/recipe.yaml"], "/nonexistent/recipe.yaml"),
    ("recipe-unknown-key", "distill", lambda m, f, t: ["--config", str(f["unknown_key_recipe.yaml"])], "not_a_field"),
    ("recipe-bad-number", "distill", lambda m, f, t: ["--config", str(f["bad_lr_recipe.yaml"])], "learning_rate='fast'"),
    ("max-steps-zero", "distill", lambda m, f, t: distill_args(m, t, "--max_steps", "0"), "max_steps=0"),
    ("output-dir-under-a-file", "distill", lambda m, f, t: distill_args(m, t, "--output_dir", str(f["a_file"] / "o")),
     "output_dir"),
    ("resume-missing-checkpoint", "distill", lambda m, f, t: distill_args(m, t, "--resume", "/nonexistent/checkpoint-9"),
     "not a complete checkpoint"),
    ("distill-model-typo", "distill", lambda m, f, t: distill_args("./no/such/model", t), "./no/such/model"),
    ("distill-missing-kv-config", "distill", lambda m, f, t: distill_args(m, t, "--kv_config", "/nonexistent/k.yaml"),
     "/nonexistent/k.yaml"),
    ("train-projections-without-lowrank", "distill", lambda m, f, t: distill_args(m, t, "--train_projections", "true"),
     "train_projections=true needs"),
    ("prefill-not-below-block", "distill", lambda m, f, t: distill_args(m, t, "--prefill_len", "32"), "prefill_len=32"),
    ("block-beyond-positions", "distill", lambda m, f, t: distill_args(m, t, "--block_len", "2000"), "block_len = 2000"),
    ("unknown-divergence", "distill", lambda m, f, t: distill_args(m, t, "--loss", "nosuch"), "nosuch"),
    ("missing-dataset-file", "distill", lambda m, f, t: distill_args(m, t, "--dataset_name", "/nonexistent/d.jsonl"),
     "/nonexistent/d.jsonl"),
    ("distill-bool-budget-config", "distill", lambda m, f, t: distill_args(m, t, "--kv_config", str(f["bool_budget.yaml"])),
     "'budget' = True"),
    ("grpo-recipe-unknown-key", "grpo", lambda m, f, t: ["--config", str(f["grpo_unknown_key_recipe.yaml"])],
     "unknown key(s) ['rollout_cahce']"),
    ("grpo-unknown-reward", "grpo", lambda m, f, t: grpo_args(m, t, "--rewards", "acuracy"),
     "unknown reward(s) ['acuracy']"),
    ("grpo-reward-raises", "grpo", lambda m, f, t: grpo_args(m, t, "--rewards", "bad_inputs_raises"),
     "reward 'bad_inputs_raises' raised KeyError: 'answer' on completion 0"),
    ("grpo-reward-nan", "grpo", lambda m, f, t: grpo_args(m, t, "--rewards", "bad_inputs_nan"),
     "reward 'bad_inputs_nan' returned nan for completion 0"),
    ("grpo-max-steps-zero", "grpo", lambda m, f, t: grpo_args(m, t, "--max_steps", "0"), "max_steps=0"),
    ("grpo-completion-beyond-positions", "grpo", lambda m, f, t: grpo_args(m, t, "--max_completion_length", "2000"),
     "max_completion_length = 2000 tokens exceeds"),
    ("grpo-model-typo", "grpo", lambda m, f, t: grpo_args("./no/such/model", t), "./no/such/model"),
]


# Rows whose error only the work itself can show: a reward raising or returning NaN on a sampled completion.
DURING_WORK = {"grpo-reward-raises", "grpo-reward-nan"}
PROGRESS_BAR = ("it/s]", "s/it]", "%|")


def _weights_must_not_load(*args, **kwargs):
    raise AssertionError("the weights were loaded before the input was checked")


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name,entry,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(name, entry, argv, expected, model_dir, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVTRAIN_DEBUG", "0")
    if name not in DURING_WORK:
        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _weights_must_not_load)
    run = {"cli": kvtrain_cli, "distill": distill, "grpo": grpo}[entry]
    inputs = files["a_file"].parent
    before = _contents(tmp_path), _contents(inputs)
    code, output = run(argv(model_dir, files, tmp_path), capsys)
    lines = output.strip().splitlines()
    assert code == 2, output
    assert "Traceback" not in output, output
    if name in DURING_WORK:  # training's progress bar shares the captured stream: the error is one of its lines
        assert any(expected in line and ": error: " in line for line in lines), output
        return
    assert lines and expected in lines[-1] and ": error: " in lines[-1], output
    assert not any(mark in line for line in lines for mark in PROGRESS_BAR), output
    assert (_contents(tmp_path), _contents(inputs)) == before, "the bad input changed files"


def test_debug_shows_the_traceback(model_dir, capsys):
    with pytest.raises(ValueError, match="'budget' = -3"):
        kvtrain_main(["--debug", *generate(model_dir, "--kv-budget", "-3")])


def hold_lock(folder: Path, command: str) -> subprocess.Popen:
    """A process that takes `folder`'s lock as a job would and keeps it until killed."""
    code = (f"import sys, time; from kvtrain.io import OutputLock; OutputLock({str(folder)!r}, {command!r}).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_an_output_folder_in_use_is_refused_naming_the_holder(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold_lock(out, "train/distill.py --first")
    try:
        code, output = distill(distill_args(model_dir, tmp_path, "--max_steps", "1"), capsys)
        assert code == 2 and f"pid {holder.pid}" in output and "train/distill.py --first" in output, output
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock file is left, held by no process, taken over, and removed at the end of the run.
    code, output = distill(distill_args(model_dir, tmp_path, "--max_steps", "1"), capsys)
    assert code == 0, output
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_model_producing_nan_stops_training_naming_the_step_and_layer(model_dir, tmp_path, capsys):
    broken = tmp_path / "nan-model"
    model = tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    tiny_tokenizer().save_pretrained(broken)
    code, output = distill(distill_args(broken, tmp_path, "--max_steps", "2"), capsys)
    assert code == 2 and "step 0" in output and "decoder layer 1" in output and "not finite" in output, output
    assert not (tmp_path / "out" / "kvtrain_training.json").exists()


def test_loyalty_of_a_nan_model_is_an_error_not_a_number(tmp_path):
    from kvtrain import KVCompressionConfig, evaluate_loyalty
    from kvtrain.errors import NonFiniteError

    model = tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.fill_(float("nan"))
    blocks = torch.randint(4, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteError, match="logits are not finite"):
        evaluate_loyalty(model, [KVCompressionConfig(budget=8, sinks=1, recent=2)], blocks, context_len=16,
                         progress=False)
