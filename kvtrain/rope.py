"""Rotary-embedding facts read from a transformers config."""

from __future__ import annotations


def rope_theta(config) -> float:
    """The RoPE base: transformers 5 keeps it in `rope_parameters`, older saved configs at the top level."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"config of model_type={config.model_type!r} has no rope_theta")
    return float(theta)
