"""Fitting calibration artifacts from the collected statistics: low-rank projections (method, per-layer ranks,
keys and values) and SALS bases.

Ranks are chosen on the KQ-SVD spectra whatever the method, so that methods compare at equal ranks (as the
official KQ-SVD code reuses one rank set): the key side uses the singular values of ``K Q^T`` (group queries
stacked), the value side those of ``V W_O^T`` (o_proj slices stacked). Their squared tails are exactly the
KQ-SVD calibration errors, so

* ``energy_eps``: per layer, the smallest r with tail energy <= eps^2 x total (spectra averaged over heads);
* ``rank_budget``: a total rank over layers, split by `allocate_ranks` on the per-layer spectra
  ``sqrt(sum_h s_h^2)`` (adding rank r+1 to a layer removes ``sum_h s_{h,r+1}^2`` of error), which minimises
  the summed KQ-SVD objective; every layer costs the same bytes per rank, so this is "same total bytes";
* ``rank``: one rank for every layer.

Baselines on the value side are the same constructions applied to the pair (V, stacked W_O): K-SVD keeps the
principal subspace of V, Eigen Attention the joint one of ``[alpha V; W_O / alpha]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvtrain.artifacts.projections import METHODS, LowRankPair, Projections
from kvtrain.artifacts.sals_basis import SalsBasis
from kvtrain.lowrank import (
    GramAccumulator,
    JointKeyGramAccumulator,
    ValueGramAccumulator,
    allocate_ranks,
    energy_rank,
    fit_eigen_attention,
    fit_kqsvd,
    fit_ksvd,
    fit_sals_basis,
    fit_value_projection,
)
from kvtrain.lowrank.kqsvd import output_gram


@dataclass(frozen=True)
class RankChoice:
    """Exactly one of ``rank`` (uniform), ``rank_budget`` (total over layers) or ``energy_eps``, per side."""

    rank: int | None = None
    rank_budget: int | None = None
    energy_eps: float | None = 0.1

    def __post_init__(self) -> None:
        for name in ("rank", "rank_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.rank is not None and self.rank_budget is not None:
            raise ValueError(f"set one of rank={self.rank} and rank_budget={self.rank_budget}, not both")
        if self.rank is None and self.rank_budget is None:
            if self.energy_eps is None or not 0 <= self.energy_eps < 1:
                raise ValueError(f"energy_eps={self.energy_eps!r} must be in [0, 1) when no rank is given")

    def ranks(self, spectra: list[Tensor]) -> list[int]:
        """Per-layer ranks from per-layer KQ-SVD spectra ``[h_kv, d]``."""
        if self.rank is not None:
            return [self.rank] * len(spectra)
        if self.rank_budget is not None:
            merged = [s.to(torch.float64).pow(2).sum(dim=0).sqrt() for s in spectra]
            if self.rank_budget < len(spectra):
                raise ValueError(f"rank_budget={self.rank_budget} is below one rank per layer ({len(spectra)})")
            return allocate_ranks(merged, self.rank_budget)
        return [energy_rank(s, self.energy_eps) for s in spectra]


def value_pair_grams(values: ValueGramAccumulator, o_proj_weight: Tensor) -> GramAccumulator:
    """The value side as a key/query Gram pair: left = ``G_V``, right = ``G_W`` (stacked o_proj slices).

    ``group_size`` only labels the accumulator: the right rows are the group's ``g * D`` o_proj rows.
    """
    grams = GramAccumulator(values.num_kv_heads, values.head_dim, 1, values.layer_idx)
    grams.key_gram = values.value_gram
    grams.query_gram = output_gram(o_proj_weight, values.num_kv_heads, values.head_dim)
    grams.num_key_tokens = values.num_tokens
    grams.num_query_rows = o_proj_weight.shape[0] * (o_proj_weight.shape[1] // (values.num_kv_heads * values.head_dim))
    return grams


def o_proj_weights(model) -> list[Tensor]:
    """o_proj weight ``[D, h_q*d]`` of every decoder layer (float64 copies)."""
    return [layer.self_attn.o_proj.weight.detach().to(torch.float64).cpu() for layer in model.model.layers]


def kqsvd_spectra(
    grams: list[GramAccumulator], values: list[ValueGramAccumulator], o_proj: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer singular values ``[h_kv, d]`` of ``K Q^T`` and of ``V W_O^T``."""
    keys = [fit_kqsvd(g, 1).singular_values for g in grams]
    vals = [fit_value_projection(v, w, 1).singular_values for v, w in zip(values, o_proj)]
    return keys, vals


def fit_pair(grams: GramAccumulator, method: str, rank: int) -> LowRankPair:
    if method == "kqsvd":
        return fit_kqsvd(grams, rank)
    if method == "ksvd":
        return fit_ksvd(grams, rank)
    if method == "eigen":
        return fit_eigen_attention(grams, rank)[0]
    raise ValueError(f"method={method!r} is not one of {METHODS}")


def fit_projections(
    grams: list[GramAccumulator],
    values: list[ValueGramAccumulator],
    o_proj: list[Tensor],
    method: str,
    key_ranks: list[int],
    value_ranks: list[int],
) -> Projections:
    """Fit every layer's key and value pair with ``method`` at the given per-layer ranks."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    for name, ranks in (("key_ranks", key_ranks), ("value_ranks", value_ranks)):
        if len(ranks) != len(grams):
            raise ValueError(f"{name} has {len(ranks)} entries for {len(grams)} layers")
    keys = [fit_pair(g, method, r) for g, r in zip(grams, key_ranks)]
    if method == "kqsvd":
        vals = [fit_value_projection(v, w, r) for v, w, r in zip(values, o_proj, value_ranks)]
    else:
        vals = [fit_pair(value_pair_grams(v, w), method, r) for v, w, r in zip(values, o_proj, value_ranks)]
    return Projections(method, keys, vals)


def check_calibration_tokens(num_tokens: int, choices: dict[str, RankChoice]) -> None:
    """Reject an explicit rank above the number of calibration tokens before spending a pass on it."""
    for side, choice in choices.items():
        if choice.rank is not None and choice.rank > num_tokens:
            raise ValueError(
                f"{side} rank={choice.rank} needs at least {choice.rank} calibration tokens, "
                f"but the calibration data has {num_tokens} tokens"
            )


def fit_sals_bases(grams: list[JointKeyGramAccumulator]) -> list[SalsBasis]:
    """Every direction each layer's Gram determines (at most its token count), by descending eigenvalue."""
    return [fit_sals_basis(g, min(g.num_kv_heads * g.head_dim, g.num_tokens)) for g in grams]
