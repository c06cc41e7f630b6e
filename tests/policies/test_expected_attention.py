"""Expected Attention: closed form vs Monte Carlo, RoPE algebra vs transformers, the scorer vs a loop
reference, and the query-statistics file format."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvtrain.artifacts.query_stats import load_query_stats, save_query_stats
from kvtrain.models.rope import average_rotation, default_rope, unrotate
from kvtrain.policies import build_scorer
from kvtrain.policies.base import ScoreInputs
from kvtrain.policies.expected_attention import gaussian_log_mgf

from . import make_inputs

THETA = 10000.0


def hf_rotation(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[1, P, d]`` from transformers' own Llama rotary embedding."""
    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_theta=theta)
    rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, positions.numel(), head_dim)
    return rope(x, positions[None])


def test_closed_form_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    d, n, scaling = 8, 6, 8**-0.5
    mu = 0.5 * torch.randn(1, d, generator=gen, dtype=torch.float64)
    a = 0.4 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    sigma = a @ a.T + 0.05 * torch.eye(d, dtype=torch.float64)
    keys = torch.randn(n, d, generator=gen, dtype=torch.float64)
    samples = mu + torch.randn(200_000, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    monte_carlo = torch.exp(scaling * samples @ keys.T).mean(dim=0)  # E[exp(s q.k)]
    closed = gaussian_log_mgf(mu, sigma[None], keys, scaling)[0].exp()
    torch.testing.assert_close(closed, monte_carlo, rtol=0.02, atol=0)
    mean_only = gaussian_log_mgf(mu, None, keys, scaling)[0]
    torch.testing.assert_close(mean_only, scaling * (keys @ mu[0]))


@pytest.mark.parametrize(("start", "T"), [(0, 1), (7, 512), (1234, 64)])
def test_rope_average_matches_average_of_transformers_rotations(start, T):
    d = 8
    positions = torch.arange(start, start + T)
    cos, sin = hf_rotation(d, positions, THETA)
    # Column j of R_p is transformers' rotation of the basis vector e_j at position p.
    basis = torch.eye(d)[None, None].expand(1, T, d, d)  # [1, T, j, d]
    rotated, _ = apply_rotary_pos_emb(basis, basis, cos, sin, unsqueeze_dim=2)  # [1, T, j, d]
    expected = rotated[0].transpose(-1, -2).mean(dim=0)
    got = average_rotation(default_rope(d, THETA), torch.tensor([start]), T, d)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unrotation_recovers_pre_rope_queries():
    gen = torch.Generator().manual_seed(1)
    b, h, w, d = 2, 3, 5, 16
    pre = torch.randn(b, h, w, d, generator=gen)
    rope_positions = torch.stack((torch.arange(100, 100 + w), torch.arange(3000, 3000 + w)))
    post = torch.empty_like(pre)
    for bi in range(b):
        cos, sin = hf_rotation(d, rope_positions[bi], 500000.0)
        post[bi : bi + 1], _ = apply_rotary_pos_emb(pre[bi : bi + 1], pre[bi : bi + 1], cos, sin)
    assert not torch.allclose(post, pre)
    torch.testing.assert_close(unrotate(post, *default_rope(d, 500000.0)(rope_positions)), pre, atol=1e-5, rtol=0)


# --- the scorer against a loop reference --------------------------------------------------------------------


def ref_rotation(p: int, d: int, theta: float) -> torch.Tensor:
    half = d // 2
    r = torch.zeros(d, d, dtype=torch.float64)
    for i in range(half):
        a = p * theta ** (-2 * i / d)
        r[i, i] = r[i + half, i + half] = math.cos(a)
        r[i, i + half] = -math.sin(a)
        r[i + half, i] = math.sin(a)
    return r


def ref_expected_attention(
    inputs: ScoreInputs, T: int, eps: float, use_cov: bool, use_vnorm: bool, stats: tuple | None = None
) -> list:
    b, h_kv, n, d = inputs.keys.shape
    hq, w = inputs.queries.shape[1:3]
    g = hq // h_kv
    out = [[[0.0] * n for _ in range(h_kv)] for _ in range(b)]
    for bi in range(b):
        offset = int(inputs.rope_offset[bi])
        start = int(inputs.query_positions[-1]) - offset + 1
        rbar = sum(ref_rotation(p, d, inputs.rope_theta) for p in range(start, start + T)) / T
        attn = [[0.0] * n for _ in range(h_kv)]
        for h in range(hq):
            kv = h // g
            if stats is None:
                pre = []
                for t in range(w):
                    p = int(inputs.query_positions[t]) - offset
                    if p >= 0:
                        pre.append(ref_rotation(p, d, inputs.rope_theta).T @ inputs.queries[bi, h, t].double())
                mu = sum(pre) / len(pre)
                sigma = sum(torch.outer(q - mu, q - mu) for q in pre) / len(pre)
            else:
                mu, sigma = stats[0][h].double(), stats[1][h].double()
            mu_f, sigma_f = rbar @ mu, rbar @ sigma @ rbar.T
            z = {}
            for j in range(n):
                if inputs.valid[bi, kv, j]:
                    k = inputs.keys[bi, kv, j].double()
                    z[j] = inputs.scaling * float(mu_f @ k)
                    if use_cov:
                        z[j] += inputs.scaling**2 / 2 * float(k @ sigma_f @ k)
            top = max(z.values())
            total = sum(math.exp(v - top) for v in z.values())
            for j, v in z.items():
                attn[kv][j] += math.exp(v - top) / total / g
        for kv in range(h_kv):
            for j in range(n):
                if inputs.valid[bi, kv, j]:
                    vnorm = float(inputs.values[bi, kv, j].double().norm())
                    out[bi][kv][j] = (attn[kv][j] + eps) * vnorm if use_vnorm else attn[kv][j]
    return out


def assert_valid_close(scores: torch.Tensor, ref: list, inputs: ScoreInputs) -> None:
    assert torch.isfinite(scores).all()
    valid = inputs.valid
    ref_t = torch.tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(scores.double()[valid], ref_t[valid], atol=1e-5, rtol=0)


def rotated_inputs(seed: int, **kwargs) -> ScoreInputs:
    """Inputs whose keys and queries are scaled so that the covariance term matters."""
    inputs = make_inputs(seed, **kwargs)
    return ScoreInputs(**{**vars(inputs), "queries": 2.0 * inputs.queries})


@pytest.mark.parametrize(
    ("T", "eps", "use_cov", "use_vnorm"),
    [(512, 0.02, True, True), (37, 0.0, True, False), (512, 0.1, False, True)],
)
def test_online_scorer_matches_reference(T, eps, use_cov, use_vnorm):
    inputs = rotated_inputs(20)
    params = {"n_future_positions": T, "epsilon": eps, "use_covariance": use_cov, "use_vnorm": use_vnorm}
    scores, state = build_scorer("expected_attention", params)(inputs, {})
    assert state == {}
    assert_valid_close(scores, ref_expected_attention(inputs, T, eps, use_cov, use_vnorm), inputs)


def random_stats(layers: int, hq: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(layers, hq, d, generator=gen)
    a = 0.5 * torch.randn(layers, hq, d, d, generator=gen)
    return mu, a @ a.transpose(-1, -2)


def test_file_scorer_matches_reference(tmp_path):
    inputs = ScoreInputs(**{**vars(rotated_inputs(21)), "layer_idx": 1})
    mu, sigma = random_stats(3, 6, 8, 22)
    path = tmp_path / "stats.safetensors"
    save_query_stats(path, mu, sigma, {"model": "tiny"})
    scores, _ = build_scorer("expected_attention", {"stats": str(path), "n_future_positions": 64, "epsilon": 0.02})(inputs, {})
    ref = ref_expected_attention(inputs, 64, 0.02, True, True, stats=(mu[1], sigma[1]))
    assert_valid_close(scores, ref, inputs)


def test_stats_round_trip(tmp_path):
    mu, sigma = random_stats(2, 4, 8, 23)
    fingerprint = {"architecture": "LlamaForCausalLM", "num_layers": 2, "config_hash": "abc"}
    path = tmp_path / "stats.safetensors"
    save_query_stats(path, mu, sigma, fingerprint)
    loaded = load_query_stats(path)
    torch.testing.assert_close(loaded.mu, mu, atol=0, rtol=0)
    torch.testing.assert_close(loaded.sigma, sigma, atol=0, rtol=0)
    assert loaded.fingerprint == fingerprint


def test_wrong_shape_file_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "bad.safetensors"
    metadata = {"kind": "kvtrain.query_stats", "schema_version": "1", "fingerprint": json.dumps({})}
    save_file({"mu": torch.zeros(2, 4, 8), "sigma": torch.zeros(2, 4, 8, 7)}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*sigma"):
        load_query_stats(path)
    with pytest.raises(ValueError, match="sigma"):
        save_query_stats(tmp_path / "x.safetensors", torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), {})
    other = tmp_path / "other.safetensors"
    save_file({"mu": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match=r"other\.safetensors"):
        load_query_stats(other)


def test_stats_that_do_not_fit_the_model_are_rejected(tmp_path):
    inputs = make_inputs(24)  # 6 query heads of dim 8
    path = tmp_path / "stats.safetensors"
    save_query_stats(path, *random_stats(2, 4, 8, 25), {})
    with pytest.raises(ValueError, match=r"stats\.safetensors.*4 query heads"):
        build_scorer("expected_attention", {"stats": str(path)})(inputs, {})
    save_query_stats(path, *random_stats(2, 6, 8, 25), {})
    with pytest.raises(ValueError, match=r"layer_idx=5"):
        build_scorer("expected_attention", {"stats": str(path)})(ScoreInputs(**{**vars(inputs), "layer_idx": 5}), {})
