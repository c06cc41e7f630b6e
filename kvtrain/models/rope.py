"""Rotary position embeddings, in one place: the model's own rotary embedding, the default (unscaled) tables, and
rotating / un-rotating keys and queries.

Every function follows the HF ``rotate_half`` convention: ``R_p x = x * cos(p f) + rotate_half(x) * sin(p f)``
with cos/sin ``[..., d]`` whose two halves repeat the same frequencies. Where a model is at hand, prefer its own
rotary embedding (`model_rope`): it includes rope scaling (llama3, YaRN, linear), which the default tables
(`default_rope`, `rope_cos_sin`, `rope_inv_freq`) do not. Every place that rotates or un-rotates keys or queries
(Expected Attention, SALS, calibration statistics) takes a `RopeFn`, so the model's own one reaches it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kvtrain.errors import UserError

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


def model_rope(model, dtype: torch.dtype | None = None) -> RopeFn:
    """The model's own rotary embedding as a `RopeFn` (rope scaling included): cos/sin in `dtype`, by default the
    model's (what its attention rotates with); scorers and statistics ask for float32."""
    decoder = model.get_decoder()
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__}: its decoder has no `rotary_emb` to take the RoPE tables from")
    kind = rope_type(model.config)
    dtype = dtype or next(model.parameters()).dtype

    def rope(positions: Tensor) -> tuple[Tensor, Tensor]:
        # Refused when used, not when built: a cache whose scorer never un-rotates needs no fixed frequencies.
        if kind in _LENGTH_DEPENDENT_ROPE:
            raise UserError(f"rope_type={kind!r} changes its frequencies with the sequence length; un-rotating "
                            "stored keys or queries (Expected Attention, SALS, query statistics) needs fixed ones")
        # The rotary embedding reads only the dtype and device of its first argument; it computes in float32.
        return rotary(torch.empty(0, dtype=dtype, device=positions.device), positions)

    return rope


def default_rope(head_dim: int, theta: float) -> RopeFn:
    """The default (unscaled) RoPE of base `theta` as a `RopeFn` (float32), for tensors made without a model."""
    def rope(positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.float()[..., None] * rope_inv_freq(head_dim, theta, positions.device)
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    return rope


def average_rotation(rope: RopeFn, start: Tensor, n_positions: int, head_dim: int) -> Tensor:
    """``Rbar = (1/T) sum_{p=start}^{start+T-1} R_p`` ``[b, d, d]`` (float32) for RoPE start positions ``start``
    ``[b]``, with `rope`'s tables (rope scaling and its attention factor included).

    ``R_p x = x * cos_p + rotate_half(x) * sin_p``, so ``Rbar = diag(mean cos) + diag(mean sin) P`` with P the
    matrix of `rotate_half`.
    """
    if n_positions < 1:
        raise ValueError(f"n_positions={n_positions} must be >= 1")
    positions = start[:, None] + torch.arange(n_positions, device=start.device)  # [b, T]
    cos, sin = rope(positions)
    cos_bar, sin_bar = cos.float().mean(dim=1), sin.float().mean(dim=1)  # [b, d]
    half_turn = rotate_half(torch.eye(head_dim, device=start.device)).T  # column j of P is rotate_half(e_j)
    return torch.diag_embed(cos_bar) + sin_bar[..., :, None] * half_turn


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
