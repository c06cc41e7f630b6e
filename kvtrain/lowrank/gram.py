"""Streamed second-moment (Gram) accumulators for low-rank KV calibration.

Every accumulator keeps float64 d x d sums and token counts, so its memory is O(d^2) whatever the number of
calibration tokens; calibration can checkpoint it (`state_dict` / `load_state_dict`) and distributed workers
can combine theirs (`merge`, a plain sum).

Token layouts accepted by `update`: ``[T, h, d]`` (tokens first, optional mask ``[T]``) or ``[b, h, n, d]``
(the attention layout, optional mask ``[b, n]`` with True / 1 for real tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _where(layer_idx: int | None) -> str:
    return f"layer {layer_idx}" if layer_idx is not None else "layer ?"


def token_rows(x: Tensor, heads: int, mask: Tensor | None, name: str, layer_idx: int | None) -> Tensor:
    """Flatten ``x`` ([T, h, d] or [b, h, n, d]) to float64 rows per head, ``[h, N, d]``, dropping masked tokens.

    Raises ValueError naming the tensor and the layer on a wrong shape or on NaN/inf in the kept rows.
    """
    if x.dim() == 3:
        if x.shape[1] != heads:
            raise ValueError(f"{_where(layer_idx)}: {name} has {x.shape[1]} heads, expected {heads}")
        rows = x.permute(1, 0, 2)
        keep = None if mask is None else _check_mask(mask, (x.shape[0],), name, layer_idx)
    elif x.dim() == 4:
        if x.shape[1] != heads:
            raise ValueError(f"{_where(layer_idx)}: {name} has {x.shape[1]} heads, expected {heads}")
        b, _, n, d = x.shape
        rows = x.permute(1, 0, 2, 3).reshape(heads, b * n, d)
        keep = None if mask is None else _check_mask(mask, (b, n), name, layer_idx).reshape(b * n)
    else:
        raise ValueError(f"{_where(layer_idx)}: {name} must be [T, h, d] or [b, h, n, d], got {tuple(x.shape)}")
    if keep is not None:
        rows = rows[:, keep]
    rows = rows.to(torch.float64)
    if not torch.isfinite(rows).all():
        raise ValueError(f"{_where(layer_idx)}: {name} contain NaN or inf")
    return rows


def _check_mask(mask: Tensor, shape: tuple[int, ...], name: str, layer_idx: int | None) -> Tensor:
    if tuple(mask.shape) != shape:
        raise ValueError(f"{_where(layer_idx)}: mask for {name} has shape {tuple(mask.shape)}, expected {shape}")
    return mask.to(torch.bool)


def _check_loaded(state: dict[str, Any], expected: dict[str, Any], tensors: dict[str, tuple[int, ...]]) -> None:
    for key, value in expected.items():
        if key not in state:
            raise ValueError(f"state_dict is missing {key!r}")
        if state[key] != value:
            raise ValueError(f"state_dict {key}={state[key]!r} does not match this accumulator's {value!r}")
    for key, shape in tensors.items():
        if key not in state:
            raise ValueError(f"state_dict is missing {key!r}")
        if tuple(state[key].shape) != shape:
            raise ValueError(f"state_dict {key} has shape {tuple(state[key].shape)}, expected {shape}")


class GramAccumulator:
    """Per KV head: key Gram ``G_K = sum k k^T`` and group query Gram ``G_Q = sum_{j in group} sum q_j q_j^T``.

    Summing the g query heads' Grams equals the Gram of their queries stacked along the token axis, which
    is the GQA objective of KQ-SVD (one projection pair per KV head). ``key_gram`` / ``query_gram`` are
    float64 ``[h_kv, d, d]``; ``num_key_tokens`` counts key rows per head and ``num_query_rows`` counts
    stacked query rows per KV head (g per query token).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, group_size: int, layer_idx: int | None = None) -> None:
        for field, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("group_size", group_size)):
            if value <= 0:
                raise ValueError(f"{field}={value} must be positive")
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group_size = group_size
        self.layer_idx = layer_idx
        self.key_gram = torch.zeros(num_kv_heads, head_dim, head_dim, dtype=torch.float64)
        self.query_gram = torch.zeros_like(self.key_gram)
        self.num_key_tokens = 0
        self.num_query_rows = 0

    def update(self, keys: Tensor, queries: Tensor, mask: Tensor | None = None) -> None:
        """Add keys ``[T, h_kv, d]`` / ``[b, h_kv, n, d]`` and queries ``[T, h_q, d]`` / ``[b, h_q, n, d]``.

        ``mask`` (``[T]`` or ``[b, n]``, True for real tokens) applies to both, so keys and queries must then
        share the token layout.
        """
        k = token_rows(keys, self.num_kv_heads, mask, "keys", self.layer_idx)
        hq = self.num_kv_heads * self.group_size
        q = token_rows(queries, hq, mask, "queries", self.layer_idx)
        if k.shape[-1] != self.head_dim or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"{_where(self.layer_idx)}: head_dim of keys {k.shape[-1]} / queries {q.shape[-1]} "
                f"is not {self.head_dim}"
            )
        self.key_gram += torch.einsum("hnd,hne->hde", k, k)
        # Query head j belongs to KV head j // g (HF repeat_kv order).
        q = q.reshape(self.num_kv_heads, self.group_size * q.shape[1], self.head_dim)
        self.query_gram += torch.einsum("hnd,hne->hde", q, q)
        self.num_key_tokens += k.shape[1]
        self.num_query_rows += q.shape[1]

    def _config(self) -> dict[str, Any]:
        return {"num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "group_size": self.group_size}

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._config(),
            "key_gram": self.key_gram.clone(),
            "query_gram": self.query_gram.clone(),
            "num_key_tokens": self.num_key_tokens,
            "num_query_rows": self.num_query_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (self.num_kv_heads, self.head_dim, self.head_dim)
        _check_loaded(state, self._config(), {"key_gram": shape, "query_gram": shape})
        self.key_gram = state["key_gram"].to(torch.float64).clone()
        self.query_gram = state["query_gram"].to(torch.float64).clone()
        self.num_key_tokens = int(state["num_key_tokens"])
        self.num_query_rows = int(state["num_query_rows"])

    def merge(self, other: GramAccumulator) -> GramAccumulator:
        """A new accumulator holding the sum of both (distributed calibration: one per worker, then merge)."""
        if other._config() != self._config():
            raise ValueError(f"cannot merge accumulators with configs {self._config()} and {other._config()}")
        out = GramAccumulator(self.num_kv_heads, self.head_dim, self.group_size, self.layer_idx)
        out.key_gram = self.key_gram + other.key_gram
        out.query_gram = self.query_gram + other.query_gram
        out.num_key_tokens = self.num_key_tokens + other.num_key_tokens
        out.num_query_rows = self.num_query_rows + other.num_query_rows
        return out


class _SingleGram:
    """One float64 Gram (attribute named by ``_FIELD``) plus a token count; checkpointable and mergeable."""

    _FIELD = ""

    def __init__(self, num_kv_heads: int, head_dim: int, layer_idx: int | None = None) -> None:
        for field, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"{field}={value} must be positive")
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        setattr(self, self._FIELD, torch.zeros(self._shape(), dtype=torch.float64))
        self.num_tokens = 0

    def _shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _rows(self, x: Tensor, mask: Tensor | None, name: str) -> Tensor:
        rows = token_rows(x, self.num_kv_heads, mask, name, self.layer_idx)
        if rows.shape[-1] != self.head_dim:
            raise ValueError(f"{_where(self.layer_idx)}: {name} head_dim {rows.shape[-1]} is not {self.head_dim}")
        return rows

    def _config(self) -> dict[str, Any]:
        return {"num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}

    def state_dict(self) -> dict[str, Any]:
        return {**self._config(), self._FIELD: getattr(self, self._FIELD).clone(), "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_loaded(state, self._config(), {self._FIELD: self._shape()})
        setattr(self, self._FIELD, state[self._FIELD].to(torch.float64).clone())
        self.num_tokens = int(state["num_tokens"])

    def merge(self, other: "_SingleGram") -> "_SingleGram":
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(f"cannot merge accumulators with configs {self._config()} and {other._config()}")
        out = type(self)(self.num_kv_heads, self.head_dim, self.layer_idx)
        setattr(out, self._FIELD, getattr(self, self._FIELD) + getattr(other, self._FIELD))
        out.num_tokens = self.num_tokens + other.num_tokens
        return out


class ValueGramAccumulator(_SingleGram):
    """Per KV head value Gram ``G_V = sum v v^T`` (float64 ``[h_kv, d, d]``) and the token count."""

    _FIELD = "value_gram"

    def _shape(self) -> tuple[int, ...]:
        return (self.num_kv_heads, self.head_dim, self.head_dim)

    def update(self, values: Tensor, mask: Tensor | None = None) -> None:
        """Add values ``[T, h_kv, d]`` or ``[b, h_kv, n, d]`` (mask ``[T]`` / ``[b, n]``)."""
        v = self._rows(values, mask, "values")
        self.value_gram += torch.einsum("hnd,hne->hde", v, v)
        self.num_tokens += v.shape[1]


class JointKeyGramAccumulator(_SingleGram):
    """SALS calibration: Gram of pre-RoPE keys with the KV heads concatenated, ``C = K^T K``.

    ``gram`` is float64 ``[h_kv*d, h_kv*d]`` where coordinate ``h*d + i`` is channel i of KV head h.
    """

    _FIELD = "gram"

    def _shape(self) -> tuple[int, ...]:
        width = self.num_kv_heads * self.head_dim
        return (width, width)

    def update(self, keys: Tensor, mask: Tensor | None = None) -> None:
        """Add pre-RoPE keys ``[T, h_kv, d]`` or ``[b, h_kv, n, d]`` (mask ``[T]`` / ``[b, n]``)."""
        k = self._rows(keys, mask, "keys")
        joint = k.permute(1, 0, 2).reshape(k.shape[1], -1)
        self.gram += joint.T @ joint
        self.num_tokens += joint.shape[0]
