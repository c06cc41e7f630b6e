"""Baselines KQ-SVD is compared with (docs/methods.md#kq-svd), fitted from the same Gram statistics.

* K-SVD: keys and queries both projected onto the top-r right singular vectors of K (eigenvectors of G_K).
* Eigen Attention: the top-r right singular vectors of the stacked ``[alpha K; Q / alpha]``, i.e. the
  eigenvectors of ``alpha^2 G_K + G_Q / alpha^2``; alpha is given or swept, keeping per KV head the value
  with the lowest KQ calibration objective at the requested rank.

Both return `LowRankPair` with ``a = b`` (an orthonormal basis), so ``a b^T`` is a projector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvtrain.artifacts.projections import LowRankPair
from kvtrain.lowrank.gram import GramAccumulator
from kvtrain.lowrank.kqsvd import check_gram, check_rank, kq_objective

DEFAULT_ALPHAS = tuple(float(a) for a in range(1, 11))


def top_eigenvectors(gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Descending eigenpairs of symmetric ``[h, d, d]``: (eigenvectors ``[h, d, rank]``, eigenvalues ``[h, d]``)."""
    vals, vecs = torch.linalg.eigh(gram.to(torch.float64))
    vals, vecs = vals.flip(-1), vecs.flip(-1)
    return vecs[..., :rank], vals


def fit_ksvd(grams: GramAccumulator, rank: int) -> LowRankPair:
    """K-SVD: ``a = b = V_r`` (top-r eigenvectors of G_K); ``singular_values`` are those of K."""
    check_gram(grams.key_gram, "key Gram", grams.layer_idx)
    check_rank(rank, grams.head_dim, {"keys": grams.num_key_tokens}, grams.layer_idx)
    basis, vals = top_eigenvectors(grams.key_gram, rank)
    return LowRankPair(basis, basis, vals.clamp_min(0).sqrt())


def _eigen_pair(grams: GramAccumulator, rank: int, alpha: float) -> LowRankPair:
    joint = alpha**2 * grams.key_gram + grams.query_gram / alpha**2
    basis, vals = top_eigenvectors(joint, rank)
    return LowRankPair(basis, basis, vals.clamp_min(0).sqrt())


def fit_eigen_attention(
    grams: GramAccumulator, rank: int, alpha: float | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> tuple[LowRankPair, Tensor]:
    """Eigen Attention pair and the alpha used per KV head (``[h_kv]`` float64).

    With ``alpha`` given it is used for every head; otherwise each head takes the alpha in ``alphas`` whose
    pair has the smallest ``||K Q^T - (K A)(Q B)^T||_F`` on the calibration Grams at this ``rank`` (so a
    later `LowRankPair.truncate` to a lower rank is valid but not re-swept). ``singular_values`` are those of
    the stacked matrix at the chosen alpha.
    """
    check_gram(grams.key_gram, "key Gram", grams.layer_idx)
    check_gram(grams.query_gram, "query Gram", grams.layer_idx)
    check_rank(
        rank, grams.head_dim, {"keys": grams.num_key_tokens, "query rows": grams.num_query_rows}, grams.layer_idx
    )
    candidates = [alpha] if alpha is not None else list(alphas)
    if not candidates or any(not a > 0 for a in candidates):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {candidates}")
    pairs = [_eigen_pair(grams, rank, a) for a in candidates]
    errors = torch.stack([kq_objective(grams.key_gram, grams.query_gram, p) for p in pairs])  # [n_alpha, h]
    best = errors.argmin(dim=0)
    heads = torch.arange(grams.num_kv_heads)
    a = torch.stack([p.a for p in pairs])[best, heads]
    sv = torch.stack([p.singular_values for p in pairs])[best, heads]
    chosen = torch.tensor(candidates, dtype=torch.float64)[best]
    return LowRankPair(a, a, sv), chosen
