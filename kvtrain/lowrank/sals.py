"""SALS (docs/methods.md#sals): pre-RoPE keys in a joint (all KV heads of a layer) rank-r latent space, latent
top-k token selection, and RoPE reconstruction of only the selected tokens.

Conventions:
* the joint key of a token is its pre-RoPE KV heads concatenated, coordinate ``h*d + i`` = channel i of
  KV head h; the basis ``U_r`` is ``[h_kv*d, r]`` with orthonormal columns, ``k~ = U_r^T k``;
* GQA: the latent query of a token averages the g query heads of each KV head before concatenation (the
  paper does not say how query heads map onto the KV-head latent). At full rank the latent score is
  therefore ``(1/g) * sum_j q_j . k_{j // g}`` (pre-RoPE), a positive multiple of the head-summed score, so
  the top-k set is that of the head-summed score;
* RoPE (`kvtrain.models.rope`): callers with a model at hand pass its own rotary embedding (rope scaling
  included) as ``rope``; `kvtrain.models.rope.rope_cos_sin` is the plain ``theta`` version.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvtrain.artifacts.sals_basis import SalsBasis
from kvtrain.lowrank.gram import JointKeyGramAccumulator
from kvtrain.models.rope import RopeFn, apply_rope


def fit_sals_basis(grams: JointKeyGramAccumulator, rank: int) -> SalsBasis:
    """Top-``rank`` eigenvectors of the joint pre-RoPE key Gram."""
    width = grams.num_kv_heads * grams.head_dim
    if not 1 <= rank <= width:
        raise ValueError(f"layer {grams.layer_idx}: rank={rank} must be in [1, h_kv*d={width}]")
    if rank > grams.num_tokens:
        raise ValueError(
            f"layer {grams.layer_idx}: rank={rank} exceeds the number of calibration tokens ({grams.num_tokens})"
        )
    if not torch.isfinite(grams.gram).all():
        raise ValueError(f"layer {grams.layer_idx}: joint key Gram contains NaN or inf")
    vals, vecs = torch.linalg.eigh(grams.gram)
    return SalsBasis(vecs.flip(-1)[:, :rank], vals.flip(-1), grams.num_kv_heads, grams.head_dim)


def _concat_heads(x: Tensor) -> Tensor:
    """[b, h, n, d] -> [b, n, h*d]."""
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def compress_keys(keys_pre_rope: Tensor, basis: SalsBasis) -> Tensor:
    """Latent keys ``[b, n, r]`` from pre-RoPE keys ``[b, h_kv, n, d]`` (one latent per token per layer)."""
    if keys_pre_rope.shape[1] != basis.num_kv_heads or keys_pre_rope.shape[-1] != basis.head_dim:
        raise ValueError(
            f"keys {tuple(keys_pre_rope.shape)} do not match the basis ({basis.num_kv_heads} KV heads x "
            f"{basis.head_dim})"
        )
    return _concat_heads(keys_pre_rope) @ basis.basis.to(keys_pre_rope.dtype)


def latent_queries(queries_pre_rope: Tensor, basis: SalsBasis) -> Tensor:
    """Latent queries ``[b, m, r]`` from pre-RoPE queries ``[b, h_q, m, d]`` (group-averaged, see module doc)."""
    b, hq, m, d = queries_pre_rope.shape
    if hq % basis.num_kv_heads or d != basis.head_dim:
        raise ValueError(
            f"queries {tuple(queries_pre_rope.shape)} do not match the basis ({basis.num_kv_heads} KV heads x "
            f"{basis.head_dim})"
        )
    grouped = queries_pre_rope.reshape(b, basis.num_kv_heads, hq // basis.num_kv_heads, m, d).mean(dim=2)
    return _concat_heads(grouped) @ basis.basis.to(queries_pre_rope.dtype)


def latent_scores(latent_q: Tensor, latent_k: Tensor, selection_rank: int) -> Tensor:
    """Selection scores ``[b, m, n]`` from the leading ``selection_rank`` (r*) latent coordinates only."""
    r = latent_k.shape[-1]
    if not 1 <= selection_rank <= r:
        raise ValueError(f"selection_rank={selection_rank} must be in [1, r={r}]")
    return latent_q[..., :selection_rank] @ latent_k[..., :selection_rank].mT


def select_tokens(
    scores: Tensor, top_k: int | Tensor, num_sinks: int = 16, num_recent: int = 64, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token set per row: the first ``num_sinks`` and last ``num_recent`` valid tokens plus the ``top_k``
    best-scoring other valid tokens.

    ``scores`` ``[b, n]``; ``top_k`` an int or one count per row ``[b]``; ``valid`` ``[b, n]`` bool (False for
    padding). Returns ``(indices, kept)``, both ``[b, K]`` with ``K = min(n, num_sinks + num_recent +
    max(top_k))``: indices ascending, ``kept`` False for the slots a row does not fill (they must be masked out).
    """
    for name, value in (("num_sinks", num_sinks), ("num_recent", num_recent)):
        if value < 0:
            raise ValueError(f"{name}={value} must be non-negative")
    b, n = scores.shape
    top_k = torch.as_tensor(top_k, dtype=torch.long, device=scores.device).expand(b)
    if bool((top_k < 0).any()):
        raise ValueError(f"top_k={top_k.tolist()} must be non-negative")
    if not torch.isfinite(scores).all():
        raise ValueError("selection scores contain NaN or inf")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.to(torch.bool)
    count = valid.long()
    sink = valid & (count.cumsum(-1) <= num_sinks)
    recent = valid & (count.flip(-1).cumsum(-1).flip(-1) <= num_recent)
    protected = sink | recent
    priority = scores.to(torch.float64).masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
    k = min(n, num_sinks + num_recent + (int(top_k.max()) if b else 0))
    # By descending priority the protected tokens come first, then the best others: a row keeps its
    # protected count plus its own top_k of them.
    order = priority.topk(k, dim=-1).indices
    allowed = protected.sum(-1, keepdim=True) + top_k[:, None]
    kept = valid.gather(-1, order) & (torch.arange(k, device=scores.device) < allowed)
    chosen, perm = order.sort(dim=-1)
    return chosen, kept.gather(-1, perm)


def reconstruct_keys(latent_k: Tensor, basis: SalsBasis, cos: Tensor, sin: Tensor) -> Tensor:
    """Post-RoPE keys ``[b, h_kv, K, d]`` from latent keys ``[b, K, r]`` and their tokens' cos/sin ``[b, K, d]``."""
    b, k, _ = latent_k.shape
    joint = latent_k @ basis.basis.to(latent_k.dtype).T
    keys = joint.reshape(b, k, basis.num_kv_heads, basis.head_dim).permute(0, 2, 1, 3)
    return apply_rope(keys, cos, sin)


def sals_decode_attention(
    query_pre_rope: Tensor,
    query_position: Tensor,
    latent_keys: Tensor,
    values: Tensor,
    key_positions: Tensor,
    basis: SalsBasis,
    scaling: float,
    top_k: int,
    selection_rank: int,
    rope: RopeFn,
    num_sinks: int = 16,
    num_recent: int = 64,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One SALS decode step for one layer.

    ``query_pre_rope`` ``[b, h_q, 1, d]``, ``query_position`` ``[b]`` (RoPE position), ``latent_keys``
    ``[b, n, r]``, ``values`` ``[b, h_kv, n, d]`` (already dequantised), ``key_positions`` ``[b, n]`` (RoPE
    positions), ``valid`` ``[b, n]``. Returns the attention output ``[b, h_q, 1, d]`` over the selected
    tokens and the selection ``(indices, kept)`` ``[b, K]`` of `select_tokens`.
    """
    b, hq, m, d = query_pre_rope.shape
    if m != 1:
        raise ValueError(f"sals_decode_attention takes one query token per row, got {m}")
    scores = latent_scores(latent_queries(query_pre_rope, basis), latent_keys, selection_rank)[:, 0]
    indices, kept = select_tokens(scores, top_k, num_sinks, num_recent, valid)
    chosen_latent = latent_keys.gather(1, indices[..., None].expand(-1, -1, latent_keys.shape[-1]))
    cos, sin = rope(key_positions.gather(1, indices))
    keys = reconstruct_keys(chosen_latent, basis, cos, sin)
    chosen_values = values.gather(2, indices[:, None, :, None].expand(-1, values.shape[1], -1, d))
    q_cos, q_sin = rope(query_position[:, None])
    query = apply_rope(query_pre_rope, q_cos, q_sin)
    group = hq // basis.num_kv_heads
    keys = keys.repeat_interleave(group, dim=1).to(query.dtype)
    chosen_values = chosen_values.repeat_interleave(group, dim=1).to(query.dtype)
    logits = (query @ keys.mT) * scaling
    logits = logits.masked_fill(~kept[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ chosen_values, indices, kept
