"""The scorer settings that reproduce NVIDIA kvpress's presses, pinned against explicit slow computations.

Expected Attention with ``n_sink`` is checked against the computation kvpress's ``ExpectedAttentionPress`` does,
written out from pre-RoPE queries; TOVA with ``heads="all"`` against the attention of the last query averaged
over every query head of the layer (kvpress's ``TOVAPress``, the TOVA paper's rule).
"""

from __future__ import annotations

import math

import pytest
import torch

from kvtrain.policies import build_scorer
from kvtrain.policies.base import ScoreInputs
from kvtrain.policies.select import select

from . import left_pad, make_inputs, ref_attention

THETA = 10000.0


def rotation(p: int, d: int) -> torch.Tensor:
    """The RoPE rotation at position p (HF rotate_half layout), float64."""
    r = torch.zeros(d, d, dtype=torch.float64)
    half = d // 2
    for i in range(half):
        a = p * THETA ** (-2 * i / d)
        r[i, i] = r[i + half, i + half] = math.cos(a)
        r[i, i + half], r[i + half, i] = -math.sin(a), math.sin(a)
    return r


def prefill_inputs(seed: int, n: int = 12, h_kv: int = 2, g: int = 2, d: int = 8) -> tuple[ScoreInputs, torch.Tensor]:
    """A one-row prefill event: every prompt query is in the window. Returns the inputs and the pre-RoPE queries."""
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randn(h_kv * g, n, d, generator=gen, dtype=torch.float64)
    post = torch.stack([torch.stack([rotation(t, d) @ pre[h, t] for t in range(n)]) for h in range(h_kv * g)])
    keys = 1.5 * torch.randn(1, h_kv, n, d, generator=gen)
    values = torch.randn(1, h_kv, n, d, generator=gen)
    positions = torch.arange(n).expand(1, h_kv, n)
    inputs = ScoreInputs(
        keys=keys,
        values=values,
        positions=positions,
        valid=torch.ones(1, h_kv, n, dtype=torch.bool),
        has_history=torch.zeros(1, h_kv, n, dtype=torch.bool),
        queries=post.float()[None],
        query_positions=torch.arange(n),
        rope_offset=torch.zeros(1, dtype=torch.long),
        scaling=d**-0.5,
        layer_idx=0,
        last_event_position=-1,
        rope_theta=THETA,
    )
    return inputs, pre


def kvpress_expected_attention(inputs: ScoreInputs, pre: torch.Tensor, n_sink: int, T: int) -> list[list[float]]:
    """Expected attention as kvpress computes it at prefill: statistics of the pre-RoPE queries after the first
    ``n_sink`` tokens, RoPE averaged over positions n..n+T-1, softmax over the keys after the sinks, mean over the
    GQA group, times the value norm. Sinks are left out (kvpress gives them the maximum score + 1)."""
    _, h_kv, n, d = inputs.keys.shape
    g = pre.shape[0] // h_kv
    rbar = sum(rotation(p, d) for p in range(n, n + T)) / T
    out = [[0.0] * n for _ in range(h_kv)]
    for h in range(pre.shape[0]):
        kv = h // g
        qs = [pre[h, t] for t in range(n_sink, n)]
        mu = sum(qs) / len(qs)
        cov = sum(torch.outer(q - mu, q - mu) for q in qs) / len(qs)
        mu_f, cov_f = rbar @ mu, rbar @ cov @ rbar.T
        z = []
        for j in range(n_sink, n):
            k = inputs.keys[0, kv, j].double()
            z.append(float(mu_f @ k) / math.sqrt(d) + float(k @ cov_f @ k) / d / 2)
        top = max(z)
        total = sum(math.exp(v - top) for v in z)
        for j, v in zip(range(n_sink, n), z):
            out[kv][j] += math.exp(v - top) / total / g
    for kv in range(h_kv):
        for j in range(n_sink, n):
            out[kv][j] *= float(inputs.values[0, kv, j].double().norm())
    return out


@pytest.mark.parametrize("n_sink", [0, 4])
def test_expected_attention_reproduces_kvpress_computation(n_sink):
    inputs, pre = prefill_inputs(0)
    T = 16
    scores, _ = build_scorer("expected_attention", {"n_sink": n_sink, "n_future_positions": T})(inputs, {})
    ref = torch.tensor(kvpress_expected_attention(inputs, pre, n_sink, T), dtype=torch.float64)[None]
    torch.testing.assert_close(scores[..., n_sink:].double(), ref[..., n_sink:], atol=1e-6, rtol=1e-4)
    assert torch.isinf(scores[..., :n_sink]).all()  # sinks always win, like kvpress's max + 1


def test_expected_attention_kvpress_keep_set():
    # kvpress keeps int(n * (1 - ratio)) keys per KV head, the sinks among them, and nothing else is protected.
    inputs, pre = prefill_inputs(1, n=20)
    scores, _ = build_scorer("expected_attention", {"n_sink": 4, "n_future_positions": 8})(inputs, {})
    budget = int(20 * (1 - 0.6))
    keep_idx, keep_valid = select(scores, inputs.valid, inputs.positions, budget)
    ref = kvpress_expected_attention(inputs, pre, 4, 8)
    for kv in range(2):
        ranked = sorted(range(4, 20), key=lambda j: -ref[kv][j])
        assert set(keep_idx[0, kv][keep_valid[0, kv]].tolist()) == {0, 1, 2, 3, *ranked[: budget - 4]}


def test_expected_attention_sinks_are_counted_from_the_first_real_token():
    inputs, _ = prefill_inputs(2)
    state: dict = {}
    padded, _ = left_pad(inputs, state, 3)
    scorer = build_scorer("expected_attention", {"n_sink": 4, "n_future_positions": 16})
    scores, _ = scorer(inputs, {})
    padded_scores, _ = scorer(padded, {})
    torch.testing.assert_close(padded_scores[..., 3:], scores, atol=1e-5, rtol=0)


def ref_tova_all_heads(inputs: ScoreInputs) -> list:
    """Per slot: the last query's attention to that slot's position, summed over every query head that can see
    it, divided by the number of query heads."""
    b, hq, w, _ = inputs.queries.shape
    h_kv, n = inputs.keys.shape[1:3]
    g = hq // h_kv
    att = ref_attention(inputs)
    out = []
    for bi in range(b):
        by_position: dict[int, float] = {}
        for h in range(hq):
            for j in range(n):
                if inputs.valid[bi, h // g, j]:
                    p = int(inputs.positions[bi, h // g, j])
                    by_position[p] = by_position.get(p, 0.0) + att[bi][h][w - 1][j] / hq
        out.append(
            [
                [by_position[int(inputs.positions[bi, kv, j])] if inputs.valid[bi, kv, j] else 0.0 for j in range(n)]
                for kv in range(h_kv)
            ]
        )
    return out


def test_tova_all_heads_matches_reference_with_ragged_heads():
    inputs = make_inputs(30)  # heads hold different positions and different numbers of empty slots
    scores, _ = build_scorer("tova", {"heads": "all"})(inputs, {})
    torch.testing.assert_close(scores.double(), torch.tensor(ref_tova_all_heads(inputs), dtype=torch.float64), atol=1e-6, rtol=0)


def test_tova_all_heads_keeps_one_set_per_layer():
    inputs, _ = prefill_inputs(3, n=16, h_kv=3, g=3)
    scores, _ = build_scorer("tova", {"heads": "all"})(inputs, {})
    keep_idx, _ = select(scores, inputs.valid, inputs.positions, 6)
    assert (keep_idx == keep_idx[:, :1]).all()
    grouped, _ = build_scorer("tova", {"heads": "group"})(inputs, {})
    keep_grouped, _ = select(grouped, inputs.valid, inputs.positions, 6)
    assert not (keep_grouped == keep_grouped[:, :1]).all()  # the per-group variant lets heads differ


def test_tova_defaults_to_one_set_per_layer():
    assert build_scorer("tova", {}).heads == "all"


def test_tova_all_heads_is_padding_invariant():
    inputs = make_inputs(31)
    padded, _ = left_pad(inputs, {}, 4)
    scorer = build_scorer("tova", {"heads": "all"})
    scores, _ = scorer(inputs, {})
    padded_scores, _ = scorer(padded, {})
    torch.testing.assert_close(padded_scores[..., 4:][inputs.valid], scores[inputs.valid], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "params", "field"), [("tova", {"heads": "kv"}, "heads"), ("expected_attention", {"n_sink": -1}, "n_sink")]
)
def test_bad_settings_raise(name, params, field):
    with pytest.raises(ValueError, match=field):
        build_scorer(name, params)
