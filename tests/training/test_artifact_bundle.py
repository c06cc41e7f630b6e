"""A distillation output carries copies of the artifact files its compression config references."""

from __future__ import annotations

import json

from kvtrain.artifacts.checkpoint import COMPRESSION_CONFIG
from kvtrain.config import KVCompressionConfig
from kvtrain.training.output import write_artifacts


def test_referenced_files_are_bundled_and_resolved(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "projections.safetensors").write_bytes(b"P" * 10)
    (calib / "quant_plan.json").write_text(json.dumps({"bits": [4]}))
    (calib / "query_stats.safetensors").write_bytes(b"Q" * 7)
    config = KVCompressionConfig.from_dict(
        {
            "budget": 64,
            "selection": "per_layer",
            "scorer": {"name": "expected_attention", "params": {"stats": str(calib / "query_stats.safetensors")}},
            "lowrank": {"projections": str(calib / "projections.safetensors")},
            "quant": {"plan": str(calib / "quant_plan.json")},
        }
    )
    out = tmp_path / "run"
    write_artifacts(out, config, {"format": "full"})
    for name in ("projections.safetensors", "quant_plan.json", "query_stats.safetensors"):
        (calib / name).unlink()  # the output must not depend on the calibration folder any more
    saved = json.loads((out / COMPRESSION_CONFIG).read_text())
    assert saved["lowrank"]["projections"] == "projections.safetensors"
    folder = out / "kv_compression"
    resolved = KVCompressionConfig.load(out / COMPRESSION_CONFIG).with_artifact_paths(lambda n: str(folder / n))
    assert (folder / "projections.safetensors").read_bytes() == b"P" * 10
    assert resolved.lowrank.projections == str(folder / "projections.safetensors")
    assert resolved.quant.plan == str(folder / "quant_plan.json")
    assert resolved.scorer.params["stats"] == str(folder / "query_stats.safetensors")
