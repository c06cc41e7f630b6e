"""The `sals` section of `KVCompressionConfig`: round trips, artifact paths, and the combinations it rejects."""

from __future__ import annotations

import pytest

from kvtrain.config import ConfigError, KVCompressionConfig, LowRankConfig, MergeConfig, QuantConfig, SalsConfig


def config(**overrides) -> KVCompressionConfig:
    fields = dict(budget=None, compression_ratio=0.0, dense_layers=[0, 1, 29],
                  sals=SalsConfig(basis="calib/kv_compression/sals_basis.safetensors", rank=48, token_fraction=0.125),
                  quant=QuantConfig(key_bits=None, value_bits=4))
    fields.update(overrides)
    return KVCompressionConfig(**fields)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    original = config()
    original.save(tmp_path / f"c{suffix}")
    loaded = KVCompressionConfig.load(tmp_path / f"c{suffix}")
    assert loaded == original
    assert loaded.sals.resolved_selection_rank == 24 and loaded.sals.sinks == 16 and loaded.sals.recent == 64


def test_yaml_with_only_the_needed_fields(tmp_path):
    (tmp_path / "c.yaml").write_text("compression_ratio: 0\nsals: {basis: b.safetensors, rank: 24, top_k: 32}\n")
    loaded = KVCompressionConfig.load(tmp_path / "c.yaml")
    assert loaded.budget is None and loaded.sals.top_k == 32 and loaded.sals.selector == "latent"


def test_with_artifact_paths_moves_the_basis():
    moved = config().with_artifact_paths(lambda p: "bundle/" + p.rsplit("/", 1)[-1])
    assert moved.sals.basis == "bundle/sals_basis.safetensors"


REJECTED = [
    ({"budget": 512, "compression_ratio": None}, "'compression_ratio' = None: SALS evicts nothing"),
    ({"compression_ratio": 0.5}, "'compression_ratio' = 0.5: SALS evicts nothing"),
    ({"merge": MergeConfig()}, "'merge' = 'keepkv': merging cannot be combined with SALS"),
    ({"lowrank": LowRankConfig(projections="p.safetensors")}, "'lowrank' = 'p.safetensors'"),
    ({"quant": QuantConfig(key_bits=4, value_bits=4)}, "'quant.key_bits' = 4"),
    ({"sals": SalsConfig(basis="b", rank=8, top_k=4, token_fraction=0.1)}, "exactly one of 'sals.top_k'"),
    ({"sals": SalsConfig(basis="b", rank=8)}, "exactly one of 'sals.top_k'"),
    ({"sals": SalsConfig(basis="", rank=8, top_k=4)}, "'sals.basis' = ''"),
    ({"sals": SalsConfig(basis="b", rank=0, top_k=4)}, "'sals.rank' = 0"),
    ({"sals": SalsConfig(basis="b", rank=8, selection_rank=9, top_k=4)}, "'sals.selection_rank' = 9"),
    ({"sals": SalsConfig(basis="b", rank=8, token_fraction=1.5)}, "'sals.token_fraction' = 1.5"),
    ({"sals": SalsConfig(basis="b", rank=8, top_k=4, sinks=-1)}, "'sals.sinks' = -1"),
    ({"sals": SalsConfig(basis="b", rank=8, top_k=4, selector="oracle")}, "'sals.selector' = 'oracle'"),
]


@pytest.mark.parametrize("overrides,message", REJECTED, ids=[m.split(":")[0] for _, m in REJECTED])
def test_rejects_impossible_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config(**overrides)


def test_unknown_sals_field_is_named(tmp_path):
    (tmp_path / "c.json").write_text('{"compression_ratio": 0, "sals": {"basis": "b", "rank": 8, "topk": 3}}')
    with pytest.raises(ConfigError, match="sals.topk"):
        KVCompressionConfig.load(tmp_path / "c.json")
