"""Compression-aware distillation: the student under replayed KV compression learns the full-cache teacher."""

from __future__ import annotations

from kvtrain.training.artifacts import load_compressed
from kvtrain.training.arguments import DistillationArguments
from kvtrain.training.losses import DIVERGENCES, LossSpec, distillation_loss

__all__ = ["DIVERGENCES", "DistillationArguments", "LossSpec", "distillation_loss", "load_compressed"]
