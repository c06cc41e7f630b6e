"""The KQ-SVD theorem: on any data its K Q^T error is at most that of K-SVD and of Eigen Attention.

The baselines are also checked against their own definitions (SVD of K; SVD of the stacked [aK; Q/a]).
"""

from __future__ import annotations

import pytest
import torch

from kvtrain.lowrank.baselines import DEFAULT_ALPHAS, fit_eigen_attention, fit_ksvd
from kvtrain.lowrank.gram import GramAccumulator
from kvtrain.lowrank.kqsvd import fit_kqsvd

H_KV, G, D, T = 2, 2, 6, 50


def _data(seed: int):
    gen = torch.Generator().manual_seed(seed)

    def aniso(rows: int, lo: float, hi: float) -> torch.Tensor:
        rot, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
        return torch.randn(rows, D, generator=gen, dtype=torch.float64) * torch.logspace(hi, lo, D,
                                                                                          dtype=torch.float64) @ rot

    keys = torch.stack([aniso(T, -1, 1) for _ in range(H_KV)])[None]
    queries = torch.stack([aniso(T, -0.5, 1.5) for _ in range(H_KV * G)])[None]
    acc = GramAccumulator(H_KV, D, G)
    acc.update(keys, queries)
    return keys, queries, acc


def _explicit_error(keys, queries, h, a, b) -> float:
    k = keys[0, h]
    q = torch.cat([queries[0, h * G + j] for j in range(G)])
    return float((k @ q.T - (k @ a) @ (q @ b).T).norm())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kqsvd_never_worse_than_ksvd_or_eigen(seed: int):
    keys, queries, acc = _data(seed)
    strictly_better = 0
    for r in range(1, D):
        kq, ks = fit_kqsvd(acc, r), fit_ksvd(acc, r)
        eigen = [fit_eigen_attention(acc, r, alpha=a)[0] for a in DEFAULT_ALPHAS]
        for h in range(H_KV):
            e_kq = _explicit_error(keys, queries, h, kq.a[h], kq.b[h])
            e_ks = _explicit_error(keys, queries, h, ks.a[h], ks.b[h])
            e_eig = min(_explicit_error(keys, queries, h, p.a[h], p.b[h]) for p in eigen)
            assert e_kq <= e_ks * (1 + 1e-9) and e_kq <= e_eig * (1 + 1e-9)
            strictly_better += e_kq < 0.99 * min(e_ks, e_eig)
    assert strictly_better > 0  # the data is anisotropic enough for the gap to show


def test_ksvd_is_the_right_singular_basis_of_k():
    keys, _, acc = _data(4)
    for r in (1, 3, 5):
        pair = fit_ksvd(acc, r)
        for h in range(H_KV):
            _, s, vh = torch.linalg.svd(keys[0, h], full_matrices=False)
            torch.testing.assert_close(pair.a[h] @ pair.a[h].T, vh[:r].T @ vh[:r])
            torch.testing.assert_close(pair.singular_values[h], s)


def test_eigen_sweep_picks_the_best_alpha_of_the_stacked_svd():
    keys, queries, acc = _data(5)
    r = 2
    pair, alphas = fit_eigen_attention(acc, r)
    for h in range(H_KV):
        k = keys[0, h]
        q = torch.cat([queries[0, h * G + j] for j in range(G)])
        errors = []
        for a in DEFAULT_ALPHAS:
            _, _, vh = torch.linalg.svd(torch.cat([a * k, q / a]), full_matrices=False)
            basis = vh[:r].T
            errors.append(_explicit_error(keys, queries, h, basis, basis))
        best = min(range(len(errors)), key=errors.__getitem__)
        assert alphas[h].item() == DEFAULT_ALPHAS[best]
        assert _explicit_error(keys, queries, h, pair.a[h], pair.b[h]) == pytest.approx(errors[best], rel=1e-9)


def test_baselines_reject_bad_ranks_and_alphas():
    _, _, acc = _data(6)
    with pytest.raises(ValueError, match="rank=0"):
        fit_ksvd(acc, 0)
    with pytest.raises(ValueError, match="alphas"):
        fit_eigen_attention(acc, 2, alphas=[])
    with pytest.raises(ValueError, match="alphas"):
        fit_eigen_attention(acc, 2, alpha=-1.0)
