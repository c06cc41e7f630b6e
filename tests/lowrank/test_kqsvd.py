"""KQ-SVD closed form against brute-force truncated SVDs of the explicit matrices (Eckart-Young)."""

from __future__ import annotations

import warnings

import pytest
import torch

from kvtrain.lowrank.gram import GramAccumulator, ValueGramAccumulator
from kvtrain.lowrank.kqsvd import (
    fit_kqsvd,
    fit_value_projection,
    fold_value_projection,
    kq_objective,
    project_cache,
    project_queries,
)

H_KV, G, D, T = 2, 2, 6, 40


def anisotropic(rows: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Rows with a spread spectrum (scales 10 .. 0.1) in a random orientation."""
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = torch.logspace(1, -1, d, dtype=torch.float64)
    return torch.randn(rows, d, generator=gen, dtype=torch.float64) * scales @ rot


def calibration(seed: int = 0, t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [1, h_kv, t, d], queries [1, h_q, t, d]."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.stack([anisotropic(t, D, gen) for _ in range(H_KV)])[None]
    queries = torch.stack([anisotropic(t, D, gen) for _ in range(H_KV * G)])[None]
    return keys, queries


def explicit_kq(keys: torch.Tensor, queries: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K [T, d] and the group's queries stacked along tokens, [g*T, d]."""
    return keys[0, h], torch.cat([queries[0, h * G + j] for j in range(G)])


def test_closed_form_equals_truncated_svd_for_every_rank():
    keys, queries = calibration()
    acc = GramAccumulator(H_KV, D, G)
    acc.update(keys, queries)
    full = fit_kqsvd(acc, D)
    for h in range(H_KV):
        k, q = explicit_kq(keys, queries, h)
        m = k @ q.T
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        torch.testing.assert_close(full.singular_values[h], s[:D])
        for r in range(1, D + 1):
            pair = fit_kqsvd(acc, r)
            approx = (k @ pair.a[h]) @ (q @ pair.b[h]).T
            best = (u[:, :r] * s[:r]) @ vh[:r]
            scale = m.norm()
            torch.testing.assert_close(approx / scale, best / scale, atol=1e-9, rtol=0)
            err = (m - approx).norm()
            torch.testing.assert_close(err**2, (s[r:] ** 2).sum(), atol=1e-9 * scale**2, rtol=1e-7)
            torch.testing.assert_close(kq_objective(acc.key_gram, acc.query_gram, pair)[h], err**2, rtol=1e-6,
                                       atol=1e-9 * scale**2)
            # Nested columns: truncating the full-rank fit is the rank-r fit.
            torch.testing.assert_close(full.truncate(r).a, pair.a)


def test_full_rank_reproduces_exact_logits():
    keys, queries = calibration(seed=3)
    acc = GramAccumulator(H_KV, D, G)
    acc.update(keys, queries)
    pair = fit_kqsvd(acc, D)
    eye = torch.eye(D, dtype=torch.float64).expand(H_KV, D, D)
    torch.testing.assert_close(pair.a @ pair.b.mT, eye, atol=1e-9, rtol=0)
    # Fresh (non-calibration) tokens: the identity holds on the whole space, not only the data.
    gen = torch.Generator().manual_seed(9)
    k_new = torch.randn(2, H_KV, 5, D, generator=gen, dtype=torch.float64)
    q_new = torch.randn(2, H_KV * G, 3, D, generator=gen, dtype=torch.float64)
    scaling = D**-0.5
    logits = project_queries(q_new, pair) @ project_cache(k_new, pair).repeat_interleave(G, 1).mT * scaling
    for bi in range(2):
        for j in range(H_KV * G):
            ref = q_new[bi, j] @ k_new[bi, j // G].T * scaling
            torch.testing.assert_close(logits[bi, j], ref, atol=1e-9, rtol=0)


def _value_setup(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    values = torch.stack([anisotropic(T, D, gen) for _ in range(H_KV)])[None]  # [1, h_kv, T, d]
    hidden = 10
    o_proj = torch.randn(hidden, H_KV * G * D, generator=gen, dtype=torch.float64)
    acc = ValueGramAccumulator(H_KV, D, layer_idx=2)
    acc.update(values)
    return values, o_proj, acc


def test_value_side_folded_o_proj_is_exact_at_full_rank():
    values, o_proj, acc = _value_setup()
    pair = fit_value_projection(acc, o_proj, D)
    folded = fold_value_projection(o_proj, pair.b, G)
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(H_KV * G, 3, T, generator=gen, dtype=torch.float64), dim=-1)
    v_small = project_cache(values, pair)[0]  # [h_kv, T, r]
    exact = torch.zeros(3, o_proj.shape[0], dtype=torch.float64)
    for j in range(H_KV * G):  # reference: o_proj applied to each head's attention output
        exact += (probs[j] @ values[0, j // G]) @ o_proj[:, j * D : (j + 1) * D].T
    heads = [probs[j] @ v_small[j // G] for j in range(H_KV * G)]
    compressed = torch.cat(heads, dim=-1) @ folded.T
    torch.testing.assert_close(compressed, exact, atol=1e-9, rtol=1e-9)


def test_value_side_error_is_optimal_for_every_rank():
    values, o_proj, acc = _value_setup(seed=6)
    for r in range(1, D + 1):
        pair = fit_value_projection(acc, o_proj, r)
        folded = fold_value_projection(o_proj, pair.b, G)
        for h in range(H_KV):
            v = values[0, h]
            w_stacked = torch.cat([o_proj[:, j * D : (j + 1) * D] for j in range(h * G, (h + 1) * G)])  # [gD, d]
            m = v @ w_stacked.T
            s = torch.linalg.svdvals(m)
            w_folded = torch.cat([folded[:, j * r : (j + 1) * r] for j in range(h * G, (h + 1) * G)])
            approx = (v @ pair.a[h]) @ w_folded.T
            err2 = ((m - approx) ** 2).sum()
            torch.testing.assert_close(err2, (s[r:] ** 2).sum(), atol=1e-9 * (m**2).sum(), rtol=1e-7)


def test_rank_above_calibration_tokens_is_an_error():
    keys, queries = calibration(t=3)
    acc = GramAccumulator(H_KV, D, G, layer_idx=4)
    acc.update(keys, queries)
    with pytest.raises(ValueError, match=r"layer 4: rank=4 exceeds the number of calibration key rows \(3\)"):
        fit_kqsvd(acc, 4)
    with pytest.raises(ValueError, match="rank=7 must be in"):
        fit_kqsvd(acc, D + 1)


def test_rank_deficient_gram_gets_a_named_ridge_and_stays_near_optimal():
    gen = torch.Generator().manual_seed(11)
    basis = torch.randn(4, D, generator=gen, dtype=torch.float64)  # keys live in a 4-dim subspace
    keys = (torch.randn(1, H_KV, T, 4, generator=gen, dtype=torch.float64) @ basis)
    queries = torch.randn(1, H_KV * G, T, D, generator=gen, dtype=torch.float64)
    acc = GramAccumulator(H_KV, D, G, layer_idx=5)
    acc.update(keys, queries)
    with pytest.warns(UserWarning, match=r"layer 5 KV head \d: key Gram is not positive definite") as record:
        pair = fit_kqsvd(acc, 3)
    assert sorted(str(w.message)[:14] for w in record) == ["layer 5 KV hea"] * H_KV
    k, q = explicit_kq(keys, queries, 0)
    m = k @ q.T
    s = torch.linalg.svdvals(m)
    err2 = ((m - (k @ pair.a[0]) @ (q @ pair.b[0]).T) ** 2).sum()
    assert err2 <= (s[3:] ** 2).sum() * (1 + 1e-6) + 1e-9 * (m**2).sum()


def test_non_finite_statistics_name_the_layer():
    keys, queries = calibration()
    acc = GramAccumulator(H_KV, D, G, layer_idx=7)
    acc.update(keys, queries)
    state = acc.state_dict()
    state["query_gram"][1, 0, 0] = float("inf")
    acc.load_state_dict(state)
    with pytest.raises(ValueError, match="layer 7: query Gram contains NaN or inf"):
        fit_kqsvd(acc, 2)
    values, o_proj, vacc = _value_setup()
    with pytest.raises(ValueError, match="layer 2: o_proj weight contains NaN"):
        fit_value_projection(vacc, o_proj.masked_fill(o_proj > 2, float("nan")), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-conditioned fit must not warn
        fit_value_projection(vacc, o_proj, 2)
