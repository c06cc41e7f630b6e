"""The sweep: a grid validated before any model loads, with errors naming the item; a killed sweep (a real
SIGKILL, or an exception after k cells) resumes to the same table as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kvtrain import ConfigError
from kvtrain.eval.summary import results_table
from kvtrain.eval.sweep import RESULTS, load_grid, read_results, run_sweep

REPO = Path(__file__).resolve().parents[2]
SUITES = {"perplexity": {"blocks": 1, "context_len": 40, "continuation_len": 8},
          "retrieval": {"lengths": [72], "depths": [0.5], "kinds": ["passkey"]}}
TADA16 = {"quant": {"group_size": 16}}


def write_grid(folder: Path, model_dir: Path, **changes) -> Path:
    grid = {"model": str(model_dir), "budgets": ["low", "high"],
            "methods": ["snapkv", {"preset": "tada", "config": TADA16}], "suites": SUITES, **changes}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_grid_cells_full_cache_first(tiny_dir, tmp_path):
    cells = load_grid(write_grid(tmp_path, tiny_dir))
    assert [c.key for c in cells[:2]] == [("base", "full", "-", "perplexity"), ("base", "full", "-", "retrieval")]
    assert len(cells) == 2 + 2 * 2 * 2
    assert cells[2].config["compression_ratio"] == 0.5 and cells[4].config["compression_ratio"] == 0.875


@pytest.mark.parametrize("changes,match", [
    ({"methods": ["snapkvv"]}, r"grid.yaml: methods\[0\]: unknown method 'snapkvv'; presets: streaming, snapkv"),
    ({"methods": [{"name": "mine", "config": {}}]}, r"methods\[0\]: a method mapping needs 'name', 'config'"),
    ({"methods": [{"name": "m", "config": {"scorer": {"name": "snap"}}, "budgets": {"low": {}, "high": {}}}]},
     r"methods.m.budgets.low: field 'scorer.name' = 'snap': unknown scorer"),
    ({"budgets": ["low", "extreme"]}, r"methods.snapkv: no settings for budget 'extreme'"),
    ({"suites": {"retreival": {}}}, r"unknown suite 'retreival'"),
    ({"suites": {"retrieval": {"depth": [0.5]}}}, r"suites.retrieval: unknown option\(s\) \['depth'\]"),
    ({"methods": ["kqsvd"]}, r"methods\[0\]: method 'kqsvd' needs calibration artifacts: set 'artifacts'"),
    ({"methods": ["kqsvd"], "artifacts": "/nowhere"},
     r"methods.kqsvd.budgets.low: file '/nowhere/kv_compression/projections.safetensors' does not exist"),
    ({"modle": "x"}, r"grid: unknown field\(s\) \['modle'\]"),
])
def test_bad_grids_name_the_item(changes, match, tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match=match):
        load_grid(write_grid(tmp_path, tiny_dir, **changes))


def test_a_checkpoint_without_kv_compression_is_refused(tiny_dir, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "kvtrain_training.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"checkpoints.trained: '.*ckpt': no kv_compression/compression.json"):
        load_grid(write_grid(tmp_path, tiny_dir, checkpoints={"trained": str(tmp_path / "ckpt")}))


def _table(out: Path) -> list[dict]:
    return results_table(read_results(out))


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_sweep(write_grid(folder, tiny_dir), folder / "out", progress=False)
    return _table(folder / "out")


def test_resume_after_sigkill_gives_the_same_table(uninterrupted, tiny_dir, tmp_path):
    grid, out = write_grid(tmp_path, tiny_dir), tmp_path / "out"
    # The child sleeps after each saved cell so that the kill lands between and inside cells, mid-sweep.
    code = ("import sys, time; from kvtrain.eval.sweep import run_sweep; "
            "run_sweep(sys.argv[1], sys.argv[2], progress=False, after_cell=lambda r: time.sleep(0.3))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code, str(grid), str(out)], env=env, cwd=REPO)
    try:
        deadline = time.time() + 240
        while not ((out / RESULTS).is_file() and len((out / RESULTS).read_text().splitlines()) >= 3):
            assert child.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    killed = read_results(out)  # every line parses: the file was replaced whole, never half-written
    assert 3 <= len(killed) < len(uninterrupted)
    resumed_keys = []
    run_sweep(grid, out, progress=False, after_cell=lambda r: resumed_keys.append(r["suite"]))
    assert len(resumed_keys) == len(uninterrupted) - len(killed)  # finished cells are not run again
    assert _table(out) == uninterrupted


def test_resume_after_an_exception_gives_the_same_table(uninterrupted, tiny_dir, tmp_path):
    grid, out = write_grid(tmp_path, tiny_dir), tmp_path / "out"

    def crash_after_four(record, seen=[]):
        seen.append(record)
        if len(seen) == 4:
            raise KeyboardInterrupt("stopped after 4 cells")

    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid, out, progress=False, after_cell=crash_after_four)
    assert len(read_results(out)) == 4
    run_sweep(grid, out, progress=False)
    assert _table(out) == uninterrupted


def test_a_changed_cell_is_refused_on_resume(tiny_dir, tmp_path):
    grid, out = write_grid(tmp_path, tiny_dir, budgets=["low"]), tmp_path / "out"
    run_sweep(grid, out, progress=False)
    changed = write_grid(tmp_path, tiny_dir, budgets=["low"], suites={**SUITES, "perplexity": {
        **SUITES["perplexity"], "blocks": 2}})
    with pytest.raises(ConfigError, match=r"cell base/full/-/perplexity was run with another configuration"):
        run_sweep(changed, out, progress=False)
    lines = (out / RESULTS).read_text().splitlines()
    assert all(json.loads(line)["result"] for line in lines)
