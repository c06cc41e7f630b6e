"""Selection: turn one compression event's per-key scores into the candidate indices to keep.

Candidates are laid out as in `kvtrain.policies.base.ScoreInputs`: ``[b, h_kv, n]`` per (batch row, KV head),
valid entries sorted by position, invalid slots (left padding, ragged heads) anywhere with ``valid`` False.

**Tie rule (the same in every mode):** among equal scores the older key (smaller position) is kept; in the
head-adaptive global pass, equal scores at equal positions are resolved by the lower head index. Protected
keys are always kept and count against the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

SELECTION_MODES = ("per_head", "per_layer", "head_adaptive")


def protected_mask(
    positions: Tensor,
    valid: Tensor,
    *,
    sinks: int,
    recent: int,
    seen: int,
    whitelist: Sequence[tuple[int, int]] = (),
) -> Tensor:
    """Keys that selection must never evict: ``[b, h_kv, n]`` bool.

    - the first ``sinks`` *valid* keys of each (row, head) (with left padding these are the first real
      tokens, not column 0);
    - the last ``recent`` columns: ``position >= seen - recent``, where ``seen`` is the number of columns
      (tokens incl. padding) seen so far;
    - every valid key whose column lies in a whitelisted half-open span ``[start, end)``.
    """
    _check_candidates(positions=positions, valid=valid)
    for name, value in (("sinks", sinks), ("recent", recent), ("seen", seen)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    # Valid keys are sorted by position, so the running count of valid slots is each key's age rank.
    rank = torch.cumsum(valid.long(), dim=-1)
    mask = valid & (rank <= sinks)
    mask |= valid & (positions >= seen - recent)
    for start, end in _checked_spans(whitelist, "whitelist"):
        mask |= valid & (positions >= start) & (positions < end)
    return mask


def select(
    scores: Tensor,
    valid: Tensor,
    positions: Tensor,
    budget: int,
    *,
    protected: Tensor | None = None,
    mode: str = "per_head",
    safeguard: float = 0.2,
    spans: list[tuple[int, int]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Keep at most ``budget`` valid keys per (row, KV head); returns ``(keep_idx, keep_valid)`` ``[b, h_kv, k]``.

    ``scores``, ``valid``, ``positions``, ``protected``: ``[b, h_kv, n]`` (higher score = keep; scores of
    invalid slots are ignored). ``keep_idx`` indexes dim 2 of the candidates, sorted by position; ``k`` is
    the largest kept count in the batch and unused slots have ``keep_valid`` False and index 0. A (row, head)
    with at most ``budget`` valid keys keeps them all. More than ``budget`` protected keys in one
    (row, head) is a ValueError.

    Modes:

    - ``per_head``: an independent top-k per KV head.
    - ``per_layer``: one shared set ranked by the mean score over heads; every head keeps the same
      positions (requires identical ``positions``/``valid`` across heads).
    - ``head_adaptive`` (AdaKV): the row's total ``h_kv * budget`` is shared by a global top-k over all heads'
      scores; each head first gets its ``floor(safeguard * budget)`` best keys (and its protected keys). This
      assumes scores are comparable across heads, which holds because scorers normalise per head
      (attention probabilities); a scorer with per-head scales would starve the low-scale heads. Heads
      keep different counts, so ``keep_valid`` is ragged.

    ``spans`` (fair eviction, docs/methods.md#pitfalls-whitelist-and-fair-eviction; ``per_head``/``per_layer``
    only): sorted, disjoint column spans ``[start, end)``. They are extended to cover the row: keys before the first span belong to the first,
    and every key from a span's start up to the next span's start belongs to that (earlier) span, so the
    last span also takes everything after it. Each span gets ``floor(kept * valid_in_span / valid)`` where
    ``kept = min(budget, valid)``; the remainder goes to the last span, spilling backwards to the previous
    spans only when a span has no room left. Protected keys count against their span's quota (more
    protected than quota is a ValueError). Top-k runs within each span; the union is kept.
    """
    _check_candidates(scores=scores, valid=valid, positions=positions)
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode={mode!r} must be one of {SELECTION_MODES}")
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget={budget!r} must be an int >= 0")
    if not 0.0 <= safeguard <= 1.0:
        raise ValueError(f"safeguard={safeguard} must be in [0, 1]")
    if torch.isnan(scores[valid]).any():
        raise ValueError("scores contain NaN at valid candidates")
    if protected is None:
        protected = torch.zeros_like(valid)
    elif protected.shape != valid.shape or protected.dtype != torch.bool:
        raise ValueError(f"protected must be a bool tensor of shape {tuple(valid.shape)}, got "
                         f"{protected.dtype} {tuple(protected.shape)}")
    protected = protected & valid
    n_protected = protected.sum(dim=-1)
    if n_protected.numel() and int(n_protected.max()) > budget:
        raise ValueError(f"{int(n_protected.max())} protected keys in one (row, KV head) exceed budget={budget}")
    scores = scores.masked_fill(~valid, 0.0)  # invalid slots may hold NaN; they are ranked last anyway
    if spans is not None and mode == "head_adaptive":
        raise ValueError("spans (fair eviction) are supported with mode 'per_head' or 'per_layer', not 'head_adaptive'")

    if mode == "head_adaptive":
        keep = _head_adaptive(scores, valid, positions, protected, budget, safeguard)
    elif mode == "per_layer":
        shared_positions = positions.masked_fill(~valid, -1)
        if (valid != valid[:, :1]).any() or (shared_positions != shared_positions[:, :1]).any():
            raise ValueError("mode='per_layer' needs the same candidate positions and validity in every KV head")
        mean = scores.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
        keep = _per_head(mean, valid[:, :1], positions[:, :1], protected.any(dim=1, keepdim=True), budget, spans)
        keep = keep.expand_as(valid)
    else:
        keep = _per_head(scores, valid, positions, protected, budget, spans)
    return _to_indices(keep, positions)


def _per_head(
    scores: Tensor, valid: Tensor, positions: Tensor, protected: Tensor, budget: int,
    spans: list[tuple[int, int]] | None,
) -> Tensor:
    n_valid = valid.sum(dim=-1)
    kept = n_valid.clamp(max=budget)
    if spans is None:
        return _keep_first(_rank(scores, positions, protected, valid), kept)
    span_of = _span_ids(positions, _checked_spans(spans, "spans"))
    in_span = [valid & (span_of == i) for i in range(len(spans))]
    quotas = _span_quotas(kept, n_valid, [m.sum(dim=-1) for m in in_span])
    keep = torch.zeros_like(valid)
    for i, (members, quota) in enumerate(zip(in_span, quotas)):
        span_protected = (protected & members).sum(dim=-1)
        if (span_protected > quota).any():
            worst = int((span_protected - quota).argmax())
            raise ValueError(
                f"span {i} {tuple(spans[i])}: {int(span_protected.flatten()[worst])} protected keys exceed its "
                f"fair quota of {int(quota.flatten()[worst])}"
            )
        keep |= _keep_first(_rank(scores, positions, protected & members, members), quota)
    return keep


def _span_quotas(kept: Tensor, n_valid: Tensor, n_in_span: list[Tensor]) -> list[Tensor]:
    """Proportional quotas ``[b, h]`` per span summing exactly to ``kept``, never above a span's size."""
    quotas = [kept * n // n_valid.clamp(min=1) for n in n_in_span]
    remainder = kept - sum(quotas)
    # Floors lose less than one key per span; the last span normally absorbs them, but a tiny last span may
    # be full, so the rest spills backwards (the spans' sizes sum to n_valid >= kept, so it always fits).
    for i in reversed(range(len(quotas))):
        extra = torch.minimum(remainder, n_in_span[i] - quotas[i])
        quotas[i] = quotas[i] + extra
        remainder = remainder - extra
    return quotas


def _head_adaptive(
    scores: Tensor, valid: Tensor, positions: Tensor, protected: Tensor, budget: int, safeguard: float
) -> Tensor:
    b, h, n = scores.shape
    n_valid = valid.sum(dim=-1)
    guaranteed = torch.minimum(protected.sum(dim=-1).clamp(min=int(safeguard * budget)), n_valid)
    keep = _keep_first(_rank(scores, positions, protected, valid), guaranteed)
    # Each head's guarantee is <= budget, so the rest of the row's total is never negative.
    rest = (n_valid.sum(dim=-1).clamp(max=h * budget) - guaranteed.sum(dim=-1))[:, None]
    open_ = (valid & ~keep).reshape(b, 1, h * n)
    order = _rank(scores.reshape(b, 1, h * n), positions.reshape(b, 1, h * n), torch.zeros_like(open_), open_)
    return keep | _keep_first(order, rest).reshape(b, h, n)


def _rank(scores: Tensor, positions: Tensor, protected: Tensor, eligible: Tensor) -> Tensor:
    """Indices along the last dim from most to least wanted: eligible protected keys, then eligible keys by
    score (older first on ties), then the rest. Three stable sorts give that lexicographic order."""
    order = torch.argsort(positions, dim=-1, stable=True)
    order = order.gather(-1, torch.argsort(scores.gather(-1, order), dim=-1, descending=True, stable=True))
    tier = (eligible.long() + (protected & eligible).long()).gather(-1, order)
    return order.gather(-1, torch.argsort(tier, dim=-1, descending=True, stable=True))


def _keep_first(order: Tensor, count: Tensor) -> Tensor:
    """Bool mask of the first ``count[...]`` entries of each ``order`` row, in candidate layout."""
    take = torch.arange(order.shape[-1], device=order.device) < count[..., None]
    return torch.zeros_like(take).scatter(-1, order, take)


def _to_indices(keep: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    counts = keep.sum(dim=-1)
    k = int(counts.max()) if counts.numel() else 0
    # Kept keys first, by position; the others sort past every real position.
    key = positions.masked_fill(~keep, torch.iinfo(torch.long).max)
    idx = torch.argsort(key, dim=-1, stable=True)[..., :k]
    keep_valid = torch.arange(k, device=keep.device) < counts[..., None]
    return idx.masked_fill(~keep_valid, 0), keep_valid


def _span_ids(positions: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    starts = torch.tensor([start for start, _ in spans], device=positions.device, dtype=positions.dtype)
    # bucketize gives 1 + the last span starting at or before the key; keys before the first span go to it.
    return (torch.bucketize(positions.contiguous(), starts, right=True) - 1).clamp(min=0)


def _checked_spans(spans: Sequence[tuple[int, int]], name: str) -> list[tuple[int, int]]:
    out = [(int(start), int(end)) for start, end in spans]
    for i, (start, end) in enumerate(out):
        if start < 0 or end <= start:
            raise ValueError(f"{name}[{i}]={spans[i]!r} must be a half-open column span with 0 <= start < end")
        if i and start < out[i - 1][1]:
            raise ValueError(f"{name} must be sorted and disjoint: {spans[i - 1]!r} overlaps or follows {spans[i]!r}")
    if name == "spans" and not out:
        raise ValueError("spans must hold at least one span (use spans=None to disable fair eviction)")
    return out


def _check_candidates(**tensors: Tensor) -> None:
    shape = None
    for name, t in tensors.items():
        if t.dim() != 3:
            raise ValueError(f"{name} must be [b, h_kv, n], got shape {tuple(t.shape)}")
        if shape is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        shape = t.shape
    if "valid" in tensors and tensors["valid"].dtype != torch.bool:
        raise ValueError(f"valid must be bool, got {tensors['valid'].dtype}")
    if "positions" in tensors and tensors["positions"].dtype.is_floating_point:
        raise ValueError(f"positions must be an integer tensor, got {tensors['positions'].dtype}")
