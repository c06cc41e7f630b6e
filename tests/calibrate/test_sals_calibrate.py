"""`kvtrain calibrate --fit sals`: the basis against an eigendecomposition of keys taken straight from k_proj,
rope scaling, load-time errors, and resume after an interruption."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvtrain.artifacts.calibration import ARTIFACT_DIR, load_artifacts
from kvtrain.artifacts.sals_basis import SALS_BASIS, read_sals_basis
from kvtrain.calibrate.run import STATE_DIR, calibrate
from kvtrain.data import load_texts, token_blocks
from kvtrain.models import tiny_model, tiny_tokenizer
from kvtrain.runtime.routing import observe_attention
from tests.calibrate.test_calibrate import Interrupt, interrupt_at

N_BLOCKS, BLOCK_LEN = 4, 48
COMMON = dict(fit=("sals",), num_blocks=N_BLOCKS, block_len=BLOCK_LEN, checkpoint_every=2, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def yarn_model() -> LlamaForCausalLM:
    """A tiny Llama whose YaRN scaling multiplies cos and sin by an attention factor != 1."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 64})
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def pre_rope_keys(model, blocks) -> dict[int, torch.Tensor]:
    """Per layer [T, h_kv*d]: k_proj of each attention's input, collected by hooks (no RoPE involved)."""
    keys = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: keys[i].append(module.k_proj(kwargs["hidden_states"])[0].double()),
            with_kwargs=True,
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            for block in blocks:
                model.model(input_ids=block[None])
    finally:
        for hook in hooks:
            hook.remove()
    return {i: torch.cat(k) for i, k in keys.items()}


@pytest.mark.parametrize("make_model", [tiny_model, yarn_model], ids=["default-rope", "yarn-scaled-rope"])
def test_basis_is_the_eigenbasis_of_k_proj_keys(tmp_path, tokenizer, make_model):
    model = make_model()
    assert model.model.rotary_emb.attention_scaling != 1.0 or make_model is tiny_model
    folder = calibrate(model, tokenizer, out_dir=tmp_path, **COMMON)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", SALS_BASIS]
    bases = load_artifacts(tmp_path, model).sals_basis
    blocks = token_blocks(tokenizer, load_texts(None, "train"), BLOCK_LEN, N_BLOCKS)
    for layer, joint in pre_rope_keys(model, blocks).items():
        vals, vecs = torch.linalg.eigh(joint.T @ joint)
        vals, vecs = vals.flip(0), vecs.flip(1)
        basis = bases[layer]
        torch.testing.assert_close(basis.eigenvalues.double(), vals, rtol=1e-4, atol=1e-4 * vals[0].item())
        for r in (4, 16):  # the leading subspaces agree (eigenvector signs are arbitrary)
            ours, ref = basis.basis[:, :r].double(), vecs[:, :r]
            assert (ours @ ours.T - ref @ ref.T).norm().item() < 1e-3
    config = json.loads((folder / "config.json").read_text())
    assert config["results"]["sals_tokens"] == [N_BLOCKS * BLOCK_LEN] * 2 and SALS_BASIS in config["files"]


@pytest.fixture(scope="module")
def basis_path(tmp_path_factory, tokenizer):
    return calibrate(tiny_model(), tokenizer, out_dir=tmp_path_factory.mktemp("calib"), **COMMON) / SALS_BASIS


def test_loading_checks_model_rank_and_file(basis_path, tmp_path):
    config = tiny_model().config
    assert [b.rank for b in read_sals_basis(basis_path, config, rank=8)] == [8, 8]
    other = tiny_model(num_layers=3).config
    with pytest.raises(ValueError, match=r"made for a different model \(model_fingerprint differs: num_hidden_layers"):
        read_sals_basis(basis_path, other, rank=8)
    with pytest.raises(ValueError, match=r"SALS rank 33 must be in \[1, h_kv\*d=32\]"):
        read_sals_basis(basis_path, config, rank=33)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(basis_path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt.safetensors: not a readable safetensors file"):
        read_sals_basis(corrupt, config, rank=8)


def test_rank_above_the_calibrated_directions(tmp_path, tokenizer):
    """16 tokens determine only 16 of the 32 joint directions."""
    folder = calibrate(tiny_model(), tokenizer, out_dir=tmp_path, **{**COMMON, "num_blocks": 1, "block_len": 16, "tada_blocks": 1})
    with pytest.raises(ValueError, match=r"rank 20 exceeds the 16 directions layer 0 was calibrated with \(16 tokens\)"):
        read_sals_basis(folder / SALS_BASIS, tiny_model().config, rank=20)


def test_resume_after_interruption_is_bit_identical(tmp_path, tokenizer, basis_path):
    model = tiny_model()
    with observe_attention(model, interrupt_at(3)), pytest.raises(Interrupt):
        calibrate(model, tokenizer, out_dir=tmp_path, **COMMON)
    progress = json.loads((tmp_path / ARTIFACT_DIR / STATE_DIR / "progress.json").read_text())
    assert progress["blocks_done"] == 2 and progress["key"]["groups"] == ["sals_grams"]
    resumed = calibrate(model, tokenizer, out_dir=tmp_path, **COMMON)
    assert (resumed / SALS_BASIS).read_bytes() == basis_path.read_bytes()
