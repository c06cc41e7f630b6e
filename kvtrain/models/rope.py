"""Rotary position embeddings, in one place: the model's own rotary embedding, the default (unscaled) tables, and
rotating / un-rotating keys and queries.

Every function follows the HF ``rotate_half`` convention: ``R_p x = x * cos(p f) + rotate_half(x) * sin(p f)``
with cos/sin ``[..., d]`` whose two halves repeat the same frequencies. Where a model is at hand, prefer its own
rotary embedding (`model_rope`): it includes rope scaling (llama3, YaRN, linear), which the default tables
(`rope_cos_sin`, `rope_inv_freq`) do not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

RopeFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # positions [b, n] -> (cos, sin) [b, n, d]

# Rope types whose frequencies depend on the longest sequence seen so far: un-rotating a stored key later
# could use other frequencies than the forward that rotated it.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_theta(config) -> float:
    """The RoPE base: transformers 5 keeps it in `rope_parameters`, older saved configs at the top level."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"config of model_type={config.model_type!r} has no rope_theta")
    return float(theta)


def rope_type(config) -> str:
    """The config's rope scaling type (``default`` when unscaled)."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def check_default_rope(config, needed_by: str) -> None:
    """Refuse a scaled RoPE where only the default frequencies are implemented; `needed_by` names the feature."""
    kind = rope_type(config)
    if kind != "default":
        raise ValueError(f"{needed_by} needs the default RoPE (rope_parameters.rope_type='default'), got {kind!r}")


def model_rope(model) -> RopeFn:
    """The model's own rotary embedding as a `RopeFn` (cos/sin in the model's dtype, rope scaling included)."""
    decoder = model.get_decoder()
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__}: its decoder has no `rotary_emb` to take the RoPE tables from")
    kind = rope_type(model.config)
    if kind in _LENGTH_DEPENDENT_ROPE:
        raise ValueError(f"rope_type={kind!r} changes its frequencies with the sequence length; kvtrain "
                         "un-rotates stored keys later and needs fixed frequencies")
    dtype = next(model.parameters()).dtype

    def rope(positions: Tensor) -> tuple[Tensor, Tensor]:
        # The rotary embedding reads only the dtype and device of its first argument.
        return rotary(torch.empty(0, dtype=dtype, device=positions.device), positions)

    return rope


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> Tensor:
    """Default RoPE inverse frequencies ``[head_dim // 2]`` (float32, computed as transformers does)."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """Default RoPE tables ``(cos, sin)`` ``[..., n, head_dim]`` (float64) for integer ``positions`` ``[..., n]``."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim: the 90-degree rotation of the HF RoPE convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[b, h, n, d]`` by cos/sin ``[b, n, d]`` (broadcast over heads)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Inverse of `apply_rope` for the same cos/sin ``[b, n, d]``: ``x`` ``[b, h, n, d]`` before RoPE.

    With ``y = x cos + rotate_half(x) sin`` (halves of cos/sin equal), ``y cos - rotate_half(y) sin =
    x (cos^2 + sin^2)``, so dividing by ``cos^2 + sin^2`` undoes RoPE exactly, also when a rope-scaling
    ``attention_factor`` multiplies cos and sin. Computed in float32 at least, returned in ``x.dtype``.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    y = x.to(compute)
    cos, sin = cos[:, None].to(compute), sin[:, None].to(compute)
    return ((y * cos - rotate_half(y) * sin) / (cos * cos + sin * sin)).to(x.dtype)


def unrotate_queries(queries: Tensor, rope_positions: Tensor, theta: float) -> Tensor:
    """Undo the default RoPE: post-RoPE ``queries`` ``[b, h, w, d]`` at positions ``[b, w]`` -> pre-RoPE, float32.

    RoPE is a rotation, so rotating by the opposite angle recovers the pre-RoPE query exactly.
    """
    d = queries.shape[-1]
    angles = rope_positions.float()[..., None] * rope_inv_freq(d, theta, queries.device)  # [b, w, d/2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # [b, 1, w, d]
    q = queries.float()
    return q * angles.cos() - rotate_half(q) * angles.sin()
