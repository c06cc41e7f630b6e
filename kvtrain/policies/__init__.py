"""Eviction policies: one scorer per module, registered by name (see `kvtrain.policies.base`), plus selection
(`select`), per-layer budgets (`budgets`) and KeepKV merging (`keepkv`)."""

from __future__ import annotations

# Importing the scorer modules registers their scorers.
from kvtrain.policies import (  # noqa: F401
    budgets,
    expected_attention,
    gates,
    gkv,
    h2o,
    keepkv,
    kvzip,
    norms,
    select,
    snapkv,
    streaming,
    tova,
)
from kvtrain.policies.base import SCORERS, ScoreInputs, Scorer, build_scorer, register_scorer

__all__ = ["SCORERS", "ScoreInputs", "Scorer", "build_scorer", "register_scorer"]
