"""RoPE scaling everywhere kvtrain rotates or un-rotates keys or queries, against transformers' own rotary
embedding and the pre-RoPE tensors read straight from the projections (after Qwen3's q/k norms).

Twins: Llama-3.1 (llama3 scaling: low frequencies divided by 8, a smooth band between), Qwen2.5 with the YaRN
block its model card documents (cos and sin also multiplied by an attention factor), and Qwen3 (unscaled, with
q/k norms) as the control where the default frequencies are right too.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvtrain.artifacts.calibration import load_artifacts
from kvtrain.calibrate.run import calibrate
from kvtrain.config import KVCompressionConfig, SalsConfig, ScheduleConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.models import ModelShape, tiny_tokenizer, twin_model
from kvtrain.models.rope import average_rotation, default_rope, model_rope, unrotate
from kvtrain.models.twins import QWEN25_YARN_ROPE_SCALING
from kvtrain.runtime.cache import CompressedCache

from .reference import eager_forward, rope_tables

TWINS = {
    "llama3": lambda: twin_model("llama-3.1-8b-instruct", seed=1),
    "yarn": lambda: twin_model("qwen2.5-7b-instruct", seed=1, rope_scaling=QWEN25_YARN_ROPE_SCALING),
    "default": lambda: twin_model("qwen3-0.6b", seed=1),
}
SCALED = ("llama3", "yarn")


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in TWINS.items()}


def transformers_rotation(model, pre: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE ``[h, n, d]`` rotated by transformers' own ``apply_rotary_pos_emb`` with the model's tables."""
    cos, sin = rope_tables(model, positions)
    return apply_rotary_pos_emb(pre[None], pre[None], cos, sin)[0][0]


@pytest.mark.parametrize("name", list(TWINS))
def test_unrotating_with_the_model_rope_recovers_the_projections_queries(models, name):
    model = models[name]
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(2))
    captured = eager_forward(model, ids, None)
    positions = torch.arange(5000, 5048)  # long contexts are where the scaled low frequencies differ
    shape = ModelShape.of(model)
    for pre in captured.pre_queries:
        post = transformers_rotation(model, pre, positions)
        recovered = unrotate(post[None], *model_rope(model, dtype=torch.float32)(positions[None]))[0]
        torch.testing.assert_close(recovered, pre, rtol=0, atol=1e-4)
        unscaled = unrotate(post[None], *default_rope(shape.head_dim, shape.rope_theta)(positions[None]))[0]
        differs = (unscaled - pre).abs().max() > 1e-2
        assert differs == (name in SCALED)  # the default frequencies are wrong exactly when RoPE is scaled


@pytest.mark.parametrize("name", list(TWINS))
def test_average_rotation_is_the_mean_of_transformers_rotations(models, name):
    model = models[name]
    d, start, count = ModelShape.of(model).head_dim, 3000, 256
    basis = torch.eye(d)[None].expand(count, d, d).transpose(0, 1)  # [j, T, d]: e_j at every position
    rotated = transformers_rotation(model, basis, torch.arange(start, start + count))  # [j, T, d]
    expected = rotated.mean(dim=1).T  # column j: the mean rotation of e_j
    got = average_rotation(model_rope(model, dtype=torch.float32), torch.tensor([start]), count, d)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(TWINS))
def test_calibrated_query_statistics_are_those_of_the_projections_queries(models, name, tmp_path):
    """Expected Attention's calibrated statistics: pre-RoPE mean and covariance per query head, first 4 skipped."""
    model, tokenizer = models[name], tiny_tokenizer()
    calibrate(model, tokenizer, out_dir=tmp_path, fit=("query-stats",), num_blocks=2, block_len=32, progress=False)
    stats = load_artifacts(tmp_path, model).query_stats
    blocks = token_blocks(tokenizer, load_texts(None, "train"), 32, 2)
    captured = [eager_forward(model, block[None], None) for block in blocks]
    for layer in range(model.config.num_hidden_layers):
        queries = torch.cat([c.pre_queries[layer][:, 4:] for c in captured], dim=1).double()  # [h_q, N, d]
        mu = queries.mean(dim=1)
        centred = queries - mu[:, None]
        sigma = centred.transpose(1, 2) @ centred / queries.shape[1]
        torch.testing.assert_close(stats.mu[layer].double(), mu, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.sigma[layer].double(), sigma, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(TWINS))
def test_sals_latents_are_those_of_the_projections_keys(models, name, tmp_path):
    """SALS stores per token the latent of the joint pre-RoPE key, un-rotating each post-RoPE key as it arrives:
    the latents must be the basis coordinates of the keys read from k_proj (k_norm for Qwen3)."""
    model = models[name]
    shape = ModelShape.of(model)
    folder = calibrate(model, tiny_tokenizer(), out_dir=tmp_path, fit=("sals",), num_blocks=2, block_len=48,
                       progress=False)
    config = KVCompressionConfig(
        budget=None, compression_ratio=0.0, schedule=ScheduleConfig(interval=4),
        sals=SalsConfig(basis=str(folder / "sals_basis.safetensors"), rank=shape.num_kv_heads * shape.head_dim // 2,
                        top_k=4, sinks=0, recent=0),
    )
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = CompressedCache.for_model(model, config)
    with torch.no_grad():  # one prefill forward attends exactly, so every layer's keys are the plain model's
        model(input_ids=ids, past_key_values=cache)
    captured = eager_forward(model, ids, None)
    for layer, pre in zip(cache.layers, captured.pre_keys):
        joint = pre.transpose(0, 1).reshape(ids.shape[1], -1)  # [S, h_kv * d]: head h's channel i at h * d + i
        torch.testing.assert_close(layer.stored.latents[0], joint @ layer.basis.basis, rtol=0, atol=1e-4)
