"""A trained checkpoint through the sweep and the report (gap closed per suite), and through `kvtrain eval`."""

from __future__ import annotations

import json

import pytest
import yaml

from kvtrain import tiny_model
from kvtrain.cli import main
from kvtrain.eval.summary import against_best_two_x, training_gaps
from kvtrain.eval.sweep import run_sweep
from kvtrain.eval.sweep_report import write_report
from kvtrain.models import model_fingerprint
from kvtrain.training.output import write_artifacts
from tests.eval.conftest import TINY, evict_config

SUITES = {"perplexity": {"blocks": 1, "context_len": 40, "continuation_len": 8},
          "retrieval": {"lengths": [72], "depths": [0.5], "kinds": ["passkey"]},
          "memory": {"lengths": [64], "decode_steps": 2}}


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """A 'distilled' tiny model: other weights of the same shape, saved with its compression like a trainer does."""
    folder = tmp_path_factory.mktemp("distilled")
    trained = tiny_model("llama", **TINY, seed=1)
    trained.save_pretrained(folder)
    tiny[1].save_pretrained(folder)
    write_artifacts(folder, evict_config(compression_ratio=0.75), {"model_fingerprint": model_fingerprint(trained.config)})
    return folder


def test_sweep_and_report_with_a_checkpoint(checkpoint, tiny_dir, tmp_path):
    grid = {"model": str(tiny_dir), "budgets": ["low"], "methods": ["snapkv"], "suites": SUITES,
            "checkpoints": {"distilled": str(checkpoint)}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    records = run_sweep(tmp_path / "grid.yaml", tmp_path / "out", progress=False)
    cells = {(r["model"], r["method"], r["budget"]) for r in records}
    assert cells == {("base", "full", "-"), ("base", "snapkv", "low"), ("distilled", "distilled", "trained"),
                     ("base", "distilled", "trained")}
    trained = [r for r in records if r["model"] == "distilled"]
    assert {r["config"]["compression_ratio"] for r in trained} == {0.75}  # the checkpoint's own compression

    gaps = {row["suite"]: row for row in training_gaps(records)}
    assert set(gaps) == {"perplexity", "retrieval"}  # memory measures no quality
    ppl = gaps["perplexity"]
    # perplexity is lower-is-better: the gap is measured on its negation, the fraction is the same
    expected = (ppl["base_compressed"] - ppl["trained_compressed"]) / (ppl["base_compressed"] - ppl["full_cache"])
    assert ppl["gap_closed"] == pytest.approx(expected)
    landing = against_best_two_x(records)
    assert {row["best_training_free"] for row in landing} == {"snapkv/low"}

    report = write_report(tmp_path / "out", records=records, model_shape={"kv_heads": 2, "head_dim": 16})
    text = report.read_text()
    assert "## Does training pay off?" in text and "gap_closed" in text and "[distilled] distilled/trained" in text
    assert "What it takes to hold >= 8x fewer bytes" in text
    for png in ("pareto_perplexity.png", "pareto_retrieval.png", "memory_bytes.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000 and f"({png})" in text
    assert (tmp_path / "out" / "table.csv").read_text().startswith("model,method,budget,suite")


def test_cli_evaluates_a_checkpoint_under_its_own_compression(checkpoint, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    code = main(["eval", "perplexity", "--model", str(checkpoint), "--set", "blocks=1", "--set", "context_len=40",
                 "--set", "continuation_len=8", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["config"]["compression_ratio"] == 0.75 and "quality_ratio" in result["relative"]


def test_cli_names_a_checkpoint_without_kv_compression(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "kvtrain_training.json").write_text((checkpoint / "kvtrain_training.json").read_text())
    assert main(["eval", "retrieval", "--model", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{broken}" in err[0] and "no kv_compression/compression.json" in err[0]


def test_report_needs_results(tmp_path):
    with pytest.raises(ValueError, match="no results to report"):
        write_report(tmp_path)
