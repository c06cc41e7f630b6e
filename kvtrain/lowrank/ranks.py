"""Rank choice for low-rank caches: a per-layer energy threshold and a global budget allocator.

By Eckart-Young, the squared error of the best rank-r approximation is the tail sum of squared singular
values, ``err(r) = sum_{i>r} s_i^2``. Its marginal gain ``err(r) - err(r+1) = s_{r+1}^2`` is non-increasing in
r (singular values are sorted), so every unit's error is convex in its rank and a greedy allocation by
marginal gain is optimal when every rank unit costs the same (the classic separable-convex resource
allocation result; see tests/lowrank/test_rank_allocation.py for the brute-force check).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from torch import Tensor


def _check_spectrum(s: Tensor, name: str) -> Tensor:
    s = s.to(torch.float64)
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    if (s[..., 1:] > s[..., :-1]).any():
        raise ValueError(f"{name} must be sorted in descending order")
    return s


def tail_energy(singular_values: Tensor) -> Tensor:
    """``tail[..., r] = sum_{i>=r} s_i^2`` for r = 0..d (``[..., d+1]``): the squared error of rank r."""
    sq = singular_values.to(torch.float64) ** 2
    tail = sq.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([tail, torch.zeros_like(tail[..., :1])], dim=-1)


def energy_rank(singular_values: Tensor, eps: float = 0.1) -> int:
    """Smallest r >= 1 with ``sum_{i>r} s_i^2 <= eps^2 * sum_i s_i^2``.

    ``singular_values`` is ``[d]`` or ``[h, d]``; with heads, the spectra are averaged over heads first (one
    rank per layer, as the official KQ-SVD code does).
    """
    if not 0 <= eps < 1:
        raise ValueError(f"eps={eps} must be in [0, 1)")
    s = _check_spectrum(singular_values, "singular_values")
    if s.dim() == 2:
        s = s.mean(dim=0)
    elif s.dim() != 1:
        raise ValueError(f"singular_values must be [d] or [h, d], got {tuple(singular_values.shape)}")
    tail = tail_energy(s)
    ok = (tail[1:] <= eps**2 * tail[0]).nonzero()
    return int(ok[0].item()) + 1


def allocate_ranks(
    spectra: Sequence[Tensor],
    budget: float,
    cost_per_rank: Sequence[float] | None = None,
    min_rank: int = 1,
) -> list[int]:
    """Ranks per unit (layer or layer-head) minimising the summed Eckart-Young error under a budget.

    ``spectra[i]`` is unit i's descending singular values ``[d_i]``; ``cost_per_rank[i]`` is what one rank of
    unit i costs (bytes per token; default 1, so ``budget`` is a total rank). Starting from ``min_rank``
    everywhere, rank is added one unit at a time where ``s_{r+1}^2 / cost`` is largest (a heap), skipping
    units whose next rank no longer fits and stopping at zero gain. Optimal for equal costs; with unequal
    costs it is the usual ratio greedy for a knapsack (near-optimal, not exact).
    """
    if not spectra:
        raise ValueError("spectra must not be empty")
    costs = [1.0] * len(spectra) if cost_per_rank is None else [float(c) for c in cost_per_rank]
    if len(costs) != len(spectra):
        raise ValueError(f"cost_per_rank has {len(costs)} entries for {len(spectra)} spectra")
    if any(not c > 0 for c in costs):
        raise ValueError(f"cost_per_rank must be positive, got {costs}")
    if min_rank < 1:
        raise ValueError(f"min_rank={min_rank} must be at least 1")
    sq = []
    for i, s in enumerate(spectra):
        s = _check_spectrum(s, f"spectra[{i}]")
        if s.dim() != 1 or s.numel() < min_rank:
            raise ValueError(f"spectra[{i}] must be 1-D with at least min_rank={min_rank} values")
        sq.append((s**2).tolist())
    ranks = [min_rank] * len(sq)
    left = budget - sum(c * min_rank for c in costs)
    if left < 0:
        raise ValueError(f"budget={budget} cannot give every unit min_rank={min_rank} (needs {budget - left})")
    heap = [(-sq[i][min_rank] / costs[i], i) for i in range(len(sq)) if min_rank < len(sq[i])]
    heapq.heapify(heap)
    while heap:
        neg_ratio, i = heapq.heappop(heap)
        if neg_ratio == 0:
            break
        if costs[i] > left:
            continue
        ranks[i] += 1
        left -= costs[i]
        if ranks[i] < len(sq[i]):
            heapq.heappush(heap, (-sq[i][ranks[i]] / costs[i], i))
    return ranks
