"""Inputs a skeptical user tried that were accepted, misreported or ran too long, each a row here: limits checked
from config.json before any weight loads, typed suite options and conflicting flags, errors that say what to do,
one message per launch, and outputs created with the process's umask.

Every CLI row runs the entry point in-process under its error boundary (the runners of `test_bad_inputs`) with
the model's weights made unloadable, so a row also fails when its check comes after the weights (or the data)
instead of before; each asserts exit code 2, the message naming the item, and nothing written.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from kvtrain import models
from kvtrain.errors import UserError
from kvtrain.eval.items import Check, EvalItem, write_items
from kvtrain.models import limits, tiny_model, tiny_tokenizer
# The same module object pytest collected (a second import under another name would register its rewards twice).
from test_bad_inputs import distill, distill_args, generate, grpo, grpo_args, kvtrain_cli, model_dir  # noqa: F401

MAX_POSITIONS = "max_position_embeddings = 1024"


@pytest.fixture
def weights_never_load(monkeypatch):
    """Loading weights fails the row: the checks under test must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Files the rows read (apart from the output folder each row must leave empty)."""
    folder = tmp_path_factory.mktemp("trust-inputs")
    item = EvalItem("a", "retrieval", [("text", "The pass key is 7.")], 1, [Check("answer", "first_number", "7")], 4)
    write_items(folder / "items.jsonl", [item])
    (folder / "responses.jsonl").write_text(json.dumps({"id": "a", "response": "7"}) + "\n")
    (folder / "empty.jsonl").write_text("")
    (folder / "a_folder").mkdir()
    return {p.name: p for p in folder.iterdir()}


def suite(name, m, out, *options):
    return ["eval", name, "--model", str(m), "--no-reference", "--out", str(out / "r.json"),
            *[arg for option in options for arg in ("--set", option)]]


def sweep(m, inputs, out, suites):
    grid = inputs["a_folder"] / "grid.yaml"
    grid.write_text(json.dumps({"model": str(m), "budgets": ["low"], "methods": ["snapkv"], "suites": suites}))
    return ["eval", "sweep", str(grid), "--out", str(out / "sweep")]


def calibrate(m, out, *extra):
    return ["calibrate", "--model", str(m), "--out", str(out / "calib"), "--no-progress", *extra]


# (id, entry point, argv(model_dir, input files, output folder), text the message must contain)
LIMITS = [
    ("retrieval-beyond-positions", "cli", lambda m, f, o: suite("retrieval", m, o, "lengths=[2000]"),
     f"max(lengths) + 20 answer tokens = 2020 tokens exceeds the model's {MAX_POSITIONS}"),
    ("memory-beyond-positions", "cli", lambda m, f, o: suite("memory", m, o, "lengths=[1020]"),
     f"max(lengths) + decode_steps = 1036 tokens exceeds the model's {MAX_POSITIONS}"),
    ("perplexity-beyond-positions", "cli", lambda m, f, o: suite("perplexity", m, o, "context_len=1000"),
     f"context_len + continuation_len = 1128 tokens exceeds the model's {MAX_POSITIONS}"),
    ("instructions-beyond-positions", "cli", lambda m, f, o: suite("instructions", m, o, "max_new_tokens=2000"),
     f"max_new_tokens (before the prompt) = 2000 tokens exceeds the model's {MAX_POSITIONS}"),
    ("sweep-beyond-positions", "cli", lambda m, f, o: sweep(m, f, o, {"perplexity": {"context_len": 1000}}),
     f"grid.yaml: suites.perplexity: context_len + continuation_len = 1128 tokens exceeds the model's {MAX_POSITIONS}"),
    ("fidelity-block-beyond-positions", "cli", lambda m, f, o: ["eval", "fidelity", "--model", str(m), "--key-bits",
                                                                "4", "--block-len", "9000", "--out", str(o / "f.json")],
     f"--block-len = 9000 tokens exceeds the model's {MAX_POSITIONS}"),
    ("calibrate-block-beyond-positions", "cli", lambda m, f, o: calibrate(m, o, "--block-len", "9000"),
     f"block_len (--block-len) = 9000 tokens exceeds the model's {MAX_POSITIONS}"),
    ("generate-beyond-positions-first", "cli", lambda m, f, o: generate(m, "--max-new-tokens", "2000"),
     f"--max-new-tokens (before the prompt) = 2000 tokens exceeds the model's {MAX_POSITIONS}"),
    ("loyalty-beyond-positions-first", "cli", lambda m, f, o: ["eval", "loyalty", "--model", str(m), "--context-len",
                                                               "2000", "--out", str(o / "l.json")], MAX_POSITIONS),
    ("distill-block-beyond-positions-first", "distill", lambda m, f, o: distill_args(m, o, "--block_len", "2000"),
     f"block_len = 2000 tokens exceeds the model's {MAX_POSITIONS}"),
    ("grpo-completion-beyond-positions-first", "grpo",
     lambda m, f, o: grpo_args(m, o, "--max_completion_length", "2000"),
     f"max_completion_length = 2000 tokens exceeds the model's {MAX_POSITIONS}"),
    ("calibrate-head-floor", "cli", lambda m, f, o: calibrate(m, o, "--head-floor", "7"),
     "head_floor=7.0: must be a number in [0.0, 1.0]"),
    ("calibrate-head-beta", "cli", lambda m, f, o: calibrate(m, o, "--head-beta", "-1"),
     "head_beta=-1.0: must be a number in [0.0, 1.0]"),
    ("calibrate-tada-budget", "cli", lambda m, f, o: calibrate(m, o, "--tada-budget", "1"),
     "tada_budget=1.0: must be a number >= 2"),
    ("calibrate-rank-beyond-head-dim", "cli", lambda m, f, o: calibrate(m, o, "--fit", "kqsvd", "--rank", "100000"),
     "rank=100000 (--rank): a rank per KV head is at most the model's head dimension, 8"),
    ("calibrate-rank-budget-beyond-head-dims", "cli",
     lambda m, f, o: calibrate(m, o, "--fit", "kqsvd", "--rank-budget", "100000"),
     "rank_budget=100000 (--rank-budget): a total over the 2 layers in [2, 16]"),
    ("calibrate-tada-group-not-dividing", "cli", lambda m, f, o: calibrate(m, o, "--fit", "tada"),
     "tada_group_size=32 (--tada-group-size): must divide the model's head dimension, 8"),
]

TYPED = [
    ("set-seed-not-int", "cli", lambda m, f, o: suite("retrieval", m, o, "seed=abc"),
     "--set: suite 'retrieval': seed='abc': must be an integer"),
    ("set-blocks-bool", "cli", lambda m, f, o: suite("perplexity", m, o, "blocks=true"),
     "--set: suite 'perplexity': blocks=True: must be an integer >= 1"),
    ("set-chains-negative", "cli", lambda m, f, o: suite("reasoning", m, o, "chains=-1"),
     "--set: suite 'reasoning': chains=-1: must be an integer >= 0"),
    ("set-lengths-not-list", "cli", lambda m, f, o: suite("retrieval", m, o, "lengths=abc"),
     "--set: suite 'retrieval': lengths='abc': must be a list of integers >= 64"),
    ("set-kinds-unknown", "cli", lambda m, f, o: suite("retrieval", m, o, "kinds=[nosuch]"),
     "kinds='[nosuch]': must be a list of strings among passkey, needle, copy"),
    ("set-kinds-unknown-json", "cli", lambda m, f, o: suite("retrieval", m, o, 'kinds=["nosuch"]'),
     "kinds=('nosuch',): must be a list of strings among passkey, needle, copy"),
    ("set-batch-size-zero", "cli", lambda m, f, o: suite("reasoning", m, o, "batch_size=0"),
     "--set: suite 'reasoning': batch_size=0: must be an integer >= 1"),
    ("set-batch-size-negative", "cli", lambda m, f, o: suite("instructions", m, o, "batch_size=-2"),
     "--set: suite 'instructions': batch_size=-2: must be an integer >= 1"),
    ("set-depths-out-of-range", "cli", lambda m, f, o: suite("retrieval", m, o, "depths=[0.5,2]"),
     "depths=(0.5, 2): must be a list of numbers in [0.0, 1.0]"),
    ("set-lengths-empty", "cli", lambda m, f, o: suite("memory", m, o, "lengths=[]"),
     "lengths=(): must be a list of integers >= 2, at least one"),
    ("generate-budget-and-ratio", "cli", lambda m, f, o: generate(m, "--kv-budget", "64", "--kv-ratio", "0.5"),
     "kv_budget = 64 and kv_ratio = 0.5 conflict: give one of them"),
    ("suite-budget-and-ratio", "cli", lambda m, f, o: suite("perplexity", m, o) + ["--kv-budget", "64", "--kv-ratio",
                                                                                  "0.5"],
     "kv_budget = 64 and kv_ratio = 0.5 conflict: give one of them"),
    ("distill-budget-and-ratio", "distill", lambda m, f, o: distill_args(m, o, "--kv_ratio", "0.5"),
     "kv_budget = 8 and kv_ratio = 0.5 conflict: give one of them"),
    ("score-empty-items", "cli", lambda m, f, o: ["eval", "score", "--items", str(f["empty.jsonl"]), "--responses",
                                                  str(f["responses.jsonl"]), "--out", str(o / "s.jsonl")],
     "empty.jsonl: no items (the file is empty)"),
]

NAMED = [
    ("loyalty-missing-data-file", "cli", lambda m, f, o: ["eval", "loyalty", "--model", str(m), "--data",
                                                          "/nonexistent/text.txt", "--out", str(o / "l.json")],
     "data file '/nonexistent/text.txt': no such file"),
    ("score-items-a-folder", "cli", lambda m, f, o: ["eval", "score", "--items", str(f["a_folder"]), "--responses",
                                                     str(f["responses.jsonl"])],
     "a_folder': is a folder; give a file"),
    ("score-responses-missing", "cli", lambda m, f, o: ["eval", "score", "--items", str(f["items.jsonl"]),
                                                        "--responses", str(f["a_folder"] / "nosuch.jsonl")],
     "nosuch.jsonl': no such file"),
]


@pytest.mark.parametrize("name,entry,argv,expected", LIMITS + TYPED + NAMED, ids=[c[0] for c in LIMITS + TYPED + NAMED])
def test_refused_before_any_work_naming_the_item(name, entry, argv, expected, model_dir, inputs, tmp_path, capsys,
                                                 monkeypatch, weights_never_load):
    monkeypatch.setenv("KVTRAIN_DEBUG", "0")
    run = {"cli": kvtrain_cli, "distill": distill, "grpo": grpo}[entry]
    code, output = run(argv(model_dir, inputs, tmp_path), capsys)
    assert code == 2, output
    assert expected in output, output
    assert "Traceback" not in output and "internal error" not in output, output
    # Nothing written: no output, no calibration checkpoint, no run folder (a lock file is the lock's own test).
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name != ".kvtrain.lock" and p.is_file()) == [], output


def test_a_request_above_the_machines_memory_is_refused_before_the_weights(model_dir, tmp_path, capsys, monkeypatch,
                                                                          weights_never_load):
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: 2**20)
    code, output = kvtrain_cli(suite("memory", model_dir, tmp_path, "lengths=[1000]"), capsys)
    assert code == 2, output
    assert "max(lengths) + decode_steps = 1016 tokens needs about" in output, output
    assert "more than the 1 MiB this machine has available: use shorter sequences" in output, output
    code, output = kvtrain_cli(calibrate(model_dir, tmp_path, "--block-len", "1000", "--fit", "kqsvd"), capsys)
    assert code == 2 and "block_len (--block-len) = 1000 tokens needs about" in output, output
    assert list(tmp_path.iterdir()) == []


def test_the_memory_estimate_counts_each_part_by_its_closed_form():
    """Against the sizes written out by hand for the tiny model (float32): weights from the parameter count
    transformers reports, the full cache of every layer, one layer's scores and softmax, MLP, logits."""
    model = tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    c, n, b = model.config, 100, 3
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    parts = limits.forward_peak_bytes(c, n, b)
    assert parts["weights"] == 4 * (model.num_parameters() - norms)
    assert parts["kv cache"] == 4 * 2 * 2 * (2 * 8) * n * b
    assert parts["attention scores"] == 4 * 2 * b * 4 * n * n
    assert parts["logits"] == 4 * b * n * c.vocab_size
    assert parts["activations"] == 4 * 3 * b * n * c.intermediate_size


# ------------------------------------------------------------------------------------- actionable errors
def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _tiny_folder(folder: Path) -> Path:
    tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_truncated_weights_in_a_folder_say_to_restore_them(tmp_path, capsys):
    folder = _tiny_folder(tmp_path / "model")
    _truncate_weights(folder)
    code, output = kvtrain_cli(generate(folder), capsys)
    assert code == 2, output
    assert f"{folder}: the model weights cannot be read" in output and "truncated or damaged" in output, output
    assert "download the model into that folder again" in output, output


def test_truncated_weights_of_an_embedded_model_say_to_rebuild_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models.embedded, "KVTRAIN_HOME", tmp_path)
    folder = _tiny_folder(tmp_path / "models" / "smollm2-135m")
    _truncate_weights(folder)
    code, output = kvtrain_cli(generate("smollm2-135m"), capsys)
    assert code == 2, output
    assert "truncated or damaged; rebuild it with `kvtrain prepare-model --force smollm2-135m`" in output, output


def test_a_full_disk_names_the_file_and_leaves_nothing(inputs, tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "scores.jsonl"
    code, output = kvtrain_cli(["eval", "score", "--items", str(inputs["items.jsonl"]), "--responses",
                                str(inputs["responses.jsonl"]), "--out", str(out)], capsys)
    assert code == 2, output
    assert f"{out}: no space left on the device while writing it" in output, output
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary sibling


def test_a_local_file_is_named_as_a_local_file_not_a_hub_id(model_dir, tmp_path, monkeypatch):
    import kvtrain

    monkeypatch.chdir(model_dir)  # "config.json" is a relative path that is also a valid Hub repo id
    with pytest.raises(UserError, match="config.json: a local file, not a directory"):
        kvtrain.load_model("config.json")
    with pytest.raises(UserError, match="model.safetensors: a local file, not a checkpoint folder"):
        kvtrain.from_pretrained("model.safetensors")


def test_the_python_api_names_the_argument():
    import kvtrain
    from kvtrain.config import ConfigError, ScheduleConfig
    from kvtrain.runtime.pretrained import CompressedModel

    with pytest.raises(ConfigError, match=r"field 'schedule' = \{'interval': 4\}: must be a ScheduleConfig"):
        kvtrain.KVCompressionConfig(schedule={"interval": 4})
    with pytest.raises(ConfigError, match=r"field 'quant' = \{'key_bits': 4\}: must be a QuantConfig or None"):
        kvtrain.KVCompressionConfig(compression_ratio=0.0, budget=None, quant={"key_bits": 4})
    assert kvtrain.KVCompressionConfig(schedule=ScheduleConfig(interval=4)).schedule.interval == 4
    model = tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2)
    with pytest.raises(TypeError, match="config must be a KVCompressionConfig, not str 'snapkv'"):
        kvtrain.CompressedCache.for_model(model, "snapkv")
    compressed = CompressedModel(model, tiny_tokenizer(), kvtrain.KVCompressionConfig(budget=8, sinks=1, recent=2),
                                 Path("."))
    for empty in ("", "  "):
        with pytest.raises(UserError, match=f"generate_text: prompt={empty!r}: give a non-empty text"):
            compressed.generate_text(empty)


@pytest.mark.parametrize("rank,said", [("0", True), ("1", False)])
def test_a_usage_error_is_said_by_the_first_rank_only(rank, said, capsys, monkeypatch):
    monkeypatch.setenv("RANK", rank)
    code, output = kvtrain_cli(["generate", "--prompt", "x", "--max-new-tokens", "abc"], capsys)
    assert code == 2 and ("--max-new-tokens: 'abc' is not an integer" in output) == said, output
    assert said or output == ""
    with pytest.raises(SystemExit) as exit_:
        distill(["--model_name_or_path", "x", "--max_steps", "abc"], capsys)
    output = capsys.readouterr()
    assert exit_.value.code == 2 and ("--max_steps" in output.err) == said and (said or output.err == ""), output


# --------------------------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=["022", "027", "002"])
def test_atomic_writes_get_the_permissions_open_would_give(mask, tmp_path):
    from kvtrain.io import atomic_write_text, write_folder_atomically

    old = os.umask(mask)
    try:
        with open(tmp_path / "by_open", "w"):
            pass
        (tmp_path / "by_mkdir").mkdir()
        atomic_write_text(tmp_path / "atomic.json", "{}")

        def write(folder: Path) -> None:  # a library that writes through a private temporary file
            (folder / "weights.safetensors").write_bytes(b"x")
            (folder / "weights.safetensors").chmod(0o600)

        write_folder_atomically(tmp_path / "folder", write)
    finally:
        os.umask(old)
    by_open = stat.S_IMODE((tmp_path / "by_open").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode) == by_open
    assert stat.S_IMODE((tmp_path / "folder" / "weights.safetensors").stat().st_mode) == by_open
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == stat.S_IMODE((tmp_path / "by_mkdir").stat().st_mode)


def test_listing_the_commands_imports_none_of_their_machinery():
    """`kvtrain --help` answers at once: it imports neither torch nor transformers (no timing asserted)."""
    import subprocess
    import sys

    code = ("import sys\nfrom kvtrain.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules)\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 0, done.stderr
    assert "calibrate" in done.stdout and "evaluation suites" in done.stdout, done.stdout


@pytest.mark.parametrize("value,hint,accepted", [
    (True, int, False), (True, float, False), (3, float, True), (float("nan"), float, False), (3.0, int, False),
    ("ab", tuple[str, ...], False), (["a", "b"], tuple[str, ...], True), ([1, True], list[int], False),
    (None, int | None, True), ("x", int | None, False), (False, bool, True),
])
def test_the_strict_checker_against_obvious_cases(value, hint, accepted):
    """The one checker of scorer parameters, suite options and calibration settings: a bool is not a number, an
    int is a float, NaN is not, a string is not a list, a list is a list of what it holds."""
    from kvtrain.typecheck import type_error

    assert (type_error(value, hint) is None) == accepted


def test_the_trained_weights_get_the_permissions_open_would_give(model_dir, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, output = distill(distill_args(model_dir, tmp_path, "--max_steps", "1", "--save_strategy", "no"), capsys)
        with open(tmp_path / "by_open", "w"):
            pass
    finally:
        os.umask(old)
    assert code == 0, output
    weights = list((tmp_path / "out").glob("*.safetensors"))
    by_open = stat.S_IMODE((tmp_path / "by_open").stat().st_mode)
    assert weights and {stat.S_IMODE(w.stat().st_mode) for w in weights} == {by_open}, weights
