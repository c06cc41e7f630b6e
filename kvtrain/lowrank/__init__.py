"""Low-rank keys/values: streamed Gram statistics, KQ-SVD and its baselines, rank choice, and SALS."""

from __future__ import annotations

from kvtrain.artifacts.projections import LowRankPair
from kvtrain.artifacts.sals_basis import SalsBasis
from kvtrain.lowrank.baselines import fit_eigen_attention, fit_ksvd
from kvtrain.lowrank.gram import GramAccumulator, JointKeyGramAccumulator, ValueGramAccumulator
from kvtrain.lowrank.kqsvd import (
    fit_kqsvd,
    fit_value_projection,
    fold_value_projection,
    kq_objective,
    project_cache,
    project_queries,
)
from kvtrain.lowrank.ranks import allocate_ranks, energy_rank, tail_energy
from kvtrain.lowrank.sals import fit_sals_basis

__all__ = [
    "GramAccumulator",
    "JointKeyGramAccumulator",
    "LowRankPair",
    "SalsBasis",
    "ValueGramAccumulator",
    "allocate_ranks",
    "energy_rank",
    "fit_eigen_attention",
    "fit_kqsvd",
    "fit_ksvd",
    "fit_sals_basis",
    "fit_value_projection",
    "fold_value_projection",
    "kq_objective",
    "project_cache",
    "project_queries",
    "tail_energy",
]
