"""Rotary-embedding facts read from a transformers config."""

from __future__ import annotations


def rope_theta(config) -> float:
    """The RoPE base of a Llama-family config (transformers 5 keeps it in `rope_parameters`)."""
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))
