"""kvtrain: make language models compression-aware (compressed KV cache runtime, replay, calibration, training)."""

__version__ = "0.1.0"
