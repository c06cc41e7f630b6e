"""Integrity on every read, one file kind at a time: a flipped byte or a truncation in a file kvtrain wrote is refused
by the one reader of its format, naming the file, and nothing is written or replaced. (Training checkpoints run
end to end in tests/training/test_integrity.py; here the kinds that need no training run.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvtrain.artifacts.calibration import load_artifacts
from kvtrain.artifacts.checkpoint import ARTIFACT_DIR, read_bundle, write_bundle
from kvtrain.artifacts.projections import read_projections
from kvtrain.artifacts.query_stats import load_query_stats
from kvtrain.cli import main as kvtrain_main
from kvtrain.errors import UserError
from kvtrain.io import MANIFEST, write_manifest
from kvtrain.models import tiny_model
from kvtrain.training.resume import resolve_resume
from tests.damage import flip, truncate
from tests.training.conftest import tiny_model_dir  # noqa: F401 (the fixture)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, tmp_path_factory) -> Path:
    """`kvtrain calibrate --out` with projections, query statistics and head budgets."""
    out = tmp_path_factory.mktemp("calibrated")
    code = kvtrain_main(["calibrate", "--model", str(tiny_model_dir), "--out", str(out), "--fit",
                         "kqsvd,query-stats,head-budgets", "--num-blocks", "2", "--block-len", "32", "--rank", "4",
                         "--head-budget", "16", "--no-progress"])
    assert code == 0
    return out / ARTIFACT_DIR


@pytest.mark.parametrize("damage", [flip, truncate])
@pytest.mark.parametrize("name", ["projections.safetensors", "query_stats.safetensors", "head_budgets.json",
                                  "config.json"])
def test_a_damaged_calibration_output_is_refused_naming_it(calibrated, tiny_model_dir, tmp_path, name, damage):
    folder = tmp_path / ARTIFACT_DIR
    shutil.copytree(calibrated, folder)
    damage(folder / name)
    before = _contents(tmp_path)
    with pytest.raises((ValueError, UserError), match=str(folder / name)):
        load_artifacts(tmp_path, tiny_model("llama", num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2))
    assert _contents(tmp_path) == before


@pytest.mark.parametrize("damage", [flip, truncate])
def test_a_tagged_artifact_is_checked_by_its_one_reader_without_the_calibration_config(calibrated, tmp_path, damage):
    """Projections and query statistics carry their digest in their own metadata: read alone (a --kv-config naming
    them, a copy elsewhere), they are still checked."""
    for name, read in (("projections.safetensors", lambda p: read_projections(p, 2, 2, 8)),
                       ("query_stats.safetensors", load_query_stats)):
        alone = tmp_path / name
        shutil.copy(calibrated / name, alone)
        read(alone)  # intact: read
        damage(alone)
        with pytest.raises((ValueError, UserError), match=str(alone)):
            read(alone)


@pytest.mark.parametrize("damage", [flip, truncate])
def test_generate_refuses_damaged_projections_named_by_kv_config(calibrated, tiny_model_dir, tmp_path, damage, capsys):
    projections = tmp_path / "projections.safetensors"
    shutil.copy(calibrated / "projections.safetensors", projections)
    damage(projections)
    config = tmp_path / "kv.json"
    config.write_text(json.dumps({"budget": None, "compression_ratio": 0.0,
                                  "lowrank": {"projections": str(projections), "key_rank": 4, "value_rank": 4}}))
    before = _contents(tmp_path)
    code = kvtrain_main(["generate", "--model", str(tiny_model_dir), "--kv-config", str(config), "--prompt", "the cat",
                         "--max-new-tokens", "2"])
    output = capsys.readouterr()
    assert code == 2 and str(projections) in output.err.strip().splitlines()[-1], output.err[-2000:]
    assert _contents(tmp_path) == before


@pytest.mark.parametrize("damage", [flip, truncate])
@pytest.mark.parametrize("name", ["compression.json", "head_budgets.json", "config.json"])
def test_a_damaged_file_of_a_trained_checkpoints_bundle_is_refused_naming_it(calibrated, tmp_path, name, damage):
    write_bundle(tmp_path, {"budget": 8, "layer_budgets": "head_budgets.json"},
                 {"head_budgets.json": calibrated / "head_budgets.json"}, {})
    read_bundle(tmp_path)
    damage(tmp_path / ARTIFACT_DIR / name)
    before = _contents(tmp_path)
    with pytest.raises((ValueError, UserError), match=str(tmp_path / ARTIFACT_DIR / name)):
        read_bundle(tmp_path)
    assert _contents(tmp_path) == before


@pytest.mark.parametrize("damage", [flip, truncate])
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt"])
def test_a_damaged_newest_checkpoint_is_skipped_by_latest_and_refused_by_path(tmp_path, name, damage):
    """Whatever files a checkpoint holds (an adapter's weights here), its manifest covers each."""
    for step in (1, 2):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        save_file({"lora_A": torch.full((16, 16), float(step))}, checkpoint / "adapter_model.safetensors")
        torch.save({"state": torch.arange(256) * step}, checkpoint / "optimizer.pt")
        torch.save({"last_epoch": step}, checkpoint / "scheduler.pt")
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        write_manifest(checkpoint)
    assert resolve_resume("latest", tmp_path) == str(tmp_path / "checkpoint-2")
    damage(tmp_path / "checkpoint-2" / name)
    assert (tmp_path / "checkpoint-2" / MANIFEST).is_file()
    assert resolve_resume("latest", tmp_path) == str(tmp_path / "checkpoint-1")
    with pytest.raises(UserError, match=rf"checkpoint-2'?: not a complete checkpoint: {name}"):
        resolve_resume(str(tmp_path / "checkpoint-2"), tmp_path)
