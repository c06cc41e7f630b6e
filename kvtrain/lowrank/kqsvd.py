"""KQ-SVD (docs/methods.md#kq-svd): the optimal rank-r factorisation of K Q^T, and of V W_O^T, from Gram matrices.

For one KV head with calibration keys K [T, d] and the group's queries stacked Q [gT, d]:
``G_K = K^T K = R_K^T R_K`` and ``G_Q = Q^T Q = R_Q^T R_Q`` (Cholesky), ``R_K R_Q^T = U S W^T`` (SVD). Then
``K = Q_K R_K`` with Q_K orthonormal, ``K Q^T = (Q_K U) S (Q_Q W)^T``, and the Eckart-Young truncation is
reached by ``A = R_K^-1 U_r`` (cache side: ``k~ = A^T k``) and ``B = R_K^T U_r`` (query side:
``q~ = B^T q``), since ``K A B^T Q^T = Q_K U_r U_r^T Q_K^T K Q^T``. The squared error of rank r is the tail
sum of ``S**2``. At r = d, ``A B^T = I``. The columns are nested, so one fit at full rank serves every r.

The value side is the same construction on ``M_v = V W^T`` with ``W = [W_O,h1; ...; W_O,hg]`` ([gD, d],
the o_proj input slices of the group's query heads stacked), whose right Gram is
``G_W = sum_j W_O,hj^T W_O,hj``. This is the exact objective (the official code averages W_O over the group).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from kvtrain.artifacts.projections import LowRankPair
from kvtrain.lowrank.gram import GramAccumulator, ValueGramAccumulator

# A Gram whose smallest eigenvalue is at most this fraction of its largest is numerically rank-deficient: it
# gets a ridge of this fraction of its largest eigenvalue. Deciding from the spectrum, not from whether a
# Cholesky factorisation happens to succeed, gives the same answer on every CPU's BLAS/LAPACK rounding.
RANK_TOLERANCE = 1e-10


def check_rank(rank: int, head_dim: int, num_rows: dict[str, int], layer_idx: int | None) -> None:
    """Reject a rank outside [1, head_dim] or above any calibration row count (named in ``num_rows``)."""
    if not 1 <= rank <= head_dim:
        raise ValueError(f"layer {layer_idx}: rank={rank} must be in [1, head_dim={head_dim}]")
    for what, n in num_rows.items():
        if rank > n:
            raise ValueError(
                f"layer {layer_idx}: rank={rank} exceeds the number of calibration {what} ({n}); "
                "collect more calibration tokens or lower the rank"
            )


def check_gram(gram: Tensor, name: str, layer_idx: int | None) -> None:
    """Reject a Gram that is not ``[h, d, d]`` or holds NaN/inf, naming it and the layer."""
    if gram.dim() != 3 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"layer {layer_idx}: {name} must be [h, d, d], got {tuple(gram.shape)}")
    if not torch.isfinite(gram).all():
        raise ValueError(f"layer {layer_idx}: {name} contains NaN or inf")


def cholesky_factor(gram: Tensor, name: str, layer_idx: int | None, head: int) -> Tensor:
    """Upper-triangular R with ``R^T R = gram`` ([d, d] float64).

    A numerically rank-deficient Gram (smallest eigenvalue <= ``RANK_TOLERANCE`` x largest) gets a ridge of
    ``RANK_TOLERANCE`` x largest eigenvalue, with a warning naming the layer and head; an all-zero Gram is an
    error.
    """
    gram = gram.to(torch.float64)
    eigenvalues = torch.linalg.eigvalsh(gram)
    largest = eigenvalues[-1].item()
    if not largest > 0:
        raise ValueError(f"layer {layer_idx} KV head {head}: {name} is zero (no calibration signal)")
    if eigenvalues[0].item() <= RANK_TOLERANCE * largest:
        ridge = RANK_TOLERANCE * largest
        warnings.warn(
            f"layer {layer_idx} KV head {head}: {name} is not positive definite (smallest/largest eigenvalue "
            f"{eigenvalues[0].item() / largest:.1e} <= {RANK_TOLERANCE:g}); added a ridge of {RANK_TOLERANCE:g} x "
            "its largest eigenvalue",
            stacklevel=3,
        )
        gram = gram + ridge * torch.eye(gram.shape[-1], dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(gram)
    if info != 0:
        raise ValueError(f"layer {layer_idx} KV head {head}: {name} is not positive definite even with a ridge")
    return chol.mT


def fit_from_grams(
    left_gram: Tensor,
    right_gram: Tensor,
    rank: int,
    num_left_rows: int,
    num_right_rows: int,
    layer_idx: int | None = None,
    names: tuple[str, str] = ("key", "query"),
) -> LowRankPair:
    """Optimal rank-r pair for ``X Y^T`` given ``G_X = X^T X`` and ``G_Y = Y^T Y`` (each ``[h_kv, d, d]``).

    ``num_left_rows`` / ``num_right_rows`` are the row counts of X and Y (calibration tokens); a rank above
    either is an error, since the rank of X Y^T cannot exceed them. ``names`` label X and Y in messages.
    """
    left_name, right_name = f"{names[0]} Gram", f"{names[1]} Gram"
    check_gram(left_gram, left_name, layer_idx)
    check_gram(right_gram, right_name, layer_idx)
    if left_gram.shape != right_gram.shape:
        raise ValueError(
            f"layer {layer_idx}: {left_name} {tuple(left_gram.shape)} and {right_name} "
            f"{tuple(right_gram.shape)} differ in shape"
        )
    heads, d, _ = left_gram.shape
    check_rank(rank, d, {f"{names[0]} rows": num_left_rows, f"{names[1]} rows": num_right_rows}, layer_idx)
    a, b, sv = [], [], []
    for h in range(heads):
        r_left = cholesky_factor(left_gram[h], left_name, layer_idx, h)
        r_right = cholesky_factor(right_gram[h], right_name, layer_idx, h)
        u, s, _ = torch.linalg.svd(r_left @ r_right.T)
        u_r = u[:, :rank]
        a.append(torch.linalg.solve_triangular(r_left, u_r, upper=True))
        b.append(r_left.T @ u_r)
        sv.append(s)
    return LowRankPair(torch.stack(a), torch.stack(b), torch.stack(sv))


def fit_kqsvd(grams: GramAccumulator, rank: int) -> LowRankPair:
    """KQ-SVD key/query pair ``a = A``, ``b = B`` ``[h_kv, d, rank]`` from accumulated post-RoPE statistics."""
    return fit_from_grams(
        grams.key_gram, grams.query_gram, rank, grams.num_key_tokens, grams.num_query_rows, grams.layer_idx
    )


def output_gram(o_proj_weight: Tensor, num_kv_heads: int, head_dim: int) -> Tensor:
    """``G_W[h] = sum_{query heads j of KV head h} W_O,j^T W_O,j`` (float64 ``[h_kv, d, d]``).

    ``o_proj_weight`` is ``[D, h_q*d]`` (nn.Linear layout: the input columns of head j are
    ``j*d:(j+1)*d``).
    """
    D, width = o_proj_weight.shape
    if width % (num_kv_heads * head_dim):
        raise ValueError(f"o_proj in_features={width} is not a multiple of num_kv_heads*head_dim")
    group = width // (num_kv_heads * head_dim)
    w = o_proj_weight.to(torch.float64).reshape(D, num_kv_heads, group, head_dim)
    return torch.einsum("nhgd,nhge->hde", w, w)


def fit_value_projection(values: ValueGramAccumulator, o_proj_weight: Tensor, rank: int) -> LowRankPair:
    """KQ-SVD on ``V W^T`` with the group's o_proj slices stacked: ``a = A_v`` (cache ``v~ = v @ A_v``) and
    ``b = B_v`` ``[h_kv, d, rank]``, to fold into o_proj with `fold_value_projection`."""
    if not torch.isfinite(o_proj_weight).all():
        raise ValueError(f"layer {values.layer_idx}: o_proj weight contains NaN or inf")
    g_w = output_gram(o_proj_weight, values.num_kv_heads, values.head_dim)
    group = o_proj_weight.shape[1] // (values.num_kv_heads * values.head_dim)
    return fit_from_grams(
        values.value_gram,
        g_w,
        rank,
        values.num_tokens,
        group * o_proj_weight.shape[0],
        values.layer_idx,
        names=("value", "o_proj"),
    )


def fold_value_projection(o_proj_weight: Tensor, value_up: Tensor, group_size: int) -> Tensor:
    """New o_proj weight ``[D, h_q*r_v]`` acting on attention outputs over compressed values.

    Query head j (KV head h = j // g) attends over ``v~ = v @ A_v[h]``, giving ``o~_j = o_j A_v[h]``; its
    output ``o_j W_O,j^T`` is approximated by ``o~_j B_v[h]^T W_O,j^T = o~_j (W_O,j B_v[h])^T``, so the
    folded slice of head j is ``W_O,j @ B_v[h]`` ([D, r_v]). ``value_up`` is ``B_v`` ``[h_kv, d, r_v]``.
    """
    D, width = o_proj_weight.shape
    h_kv, d, r = value_up.shape
    if width != h_kv * group_size * d:
        raise ValueError(
            f"o_proj in_features={width} != num_kv_heads({h_kv}) * group_size({group_size}) * head_dim({d})"
        )
    w = o_proj_weight.reshape(D, h_kv, group_size, d)
    folded = torch.einsum("nhgd,hdr->nhgr", w, value_up.to(o_proj_weight.dtype))
    return folded.reshape(D, h_kv * group_size * r)


def project_cache(x: Tensor, pair: LowRankPair) -> Tensor:
    """Cached side: ``[..., h_kv, n, d] -> [..., h_kv, n, r]`` with ``x~ = x @ a[h]``."""
    return torch.einsum("...hnd,hdr->...hnr", x, pair.a.to(x.dtype))


def project_queries(queries: Tensor, pair: LowRankPair) -> Tensor:
    """Query side: ``[b, h_q, n, d] -> [b, h_q, n, r]``, query head j using ``b[j // g]``.

    Logits are then ``project_queries(q) @ project_cache(k).T * scaling`` with the model's ORIGINAL scaling
    (head_dim ** -0.5 of the uncompressed head).
    """
    h_kv = pair.b.shape[0]
    if queries.shape[1] % h_kv:
        raise ValueError(f"{queries.shape[1]} query heads are not a multiple of {h_kv} KV heads")
    b = pair.b.to(queries.dtype).repeat_interleave(queries.shape[1] // h_kv, dim=0)
    return torch.einsum("bhnd,hdr->bhnr", queries, b)


def kq_objective(key_gram: Tensor, query_gram: Tensor, pair: LowRankPair) -> Tensor:
    """Squared calibration error ``||K Q^T - (K A)(Q B)^T||_F^2`` per KV head ``[h_kv]``, from Grams only.

    With ``X = I - A B^T``: ``||K X Q^T||_F^2 = tr(X^T G_K X G_Q)``.
    """
    a, b = pair.a.to(torch.float64), pair.b.to(torch.float64)
    eye = torch.eye(a.shape[1], dtype=torch.float64)
    x = eye - a @ b.mT
    return torch.einsum("hij,hik,hkl,hjl->h", x, key_gram, x, query_gram)
