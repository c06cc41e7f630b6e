"""Where a compressed cache's bytes go: codes, scales, means, low-rank coefficients, full-precision tokens,
bookkeeping, measured on every tensor a `CompressedCache` holds.

Counting is by storage, each storage once: a view keeps its whole buffer alive, and two names for one buffer
(a layer's `keys` and its store's recent tokens) hold it once. `held_tensors` names every tensor a cache holds for
the tokens it has seen, with its part; a field it does not know is an error, and tests/eval/test_cache_bytes.py
checks the total against an independent walk of everything reachable from the cache, so nothing can hide.

Two counts per part: ``held`` (the storages as they are, e.g. fp32 residual tokens when the model runs in fp32)
and ``at16`` (as a 16-bit model would hold them: floating storages wider than 2 bytes counted at 2 bytes per
element; packed codes, integer positions, flags and the fp16 TaDA means, scales and zero points as they are).
Quality-vs-memory comparisons use ``at16`` against a 16-bit full cache, so a run in fp32 on CPU reports what
deployment in bf16/fp16 would hold. `fraction` counts the keys and values (`PARTS`); `fraction_all` adds the
bookkeeping (`BOOKKEEPING_PARTS`: positions, validity flags, merge votes, scorer state, the scorer's query window,
recorded keep-sets). Tensors fixed by the configuration, not by the tokens (low-rank projections, SALS bases),
are `fixed_bytes`, outside the per-token figures.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

# TokenStore archive entry -> part; a name not listed here is an error (a new codec must say where it belongs).
_ARCHIVE_PARTS = {"codes": "codes", "scale": "scales", "zero": "scales", "mean": "means", "coef": "lowrank_coef",
                  "x": "residual"}
PARTS = ("codes", "scales", "means", "lowrank_coef", "residual")
BOOKKEEPING_PARTS = ("positions", "validity", "votes", "scorer_state", "query_window", "records")
# A stored-state field (StoredKV, SalsStore) -> part; TokenStore fields are split by `_ARCHIVE_PARTS`.
_FIELD_PARTS = {"positions": "positions", "valid": "validity", "has_history": "validity", "token_valid": "validity",
                "log_votes": "votes", "state": "scorer_state", "latents": "lowrank_coef"}
# Layer attributes (besides `stored`) that hold per-sequence tensors -> part.
_LAYER_PARTS = {"keys": "residual", "values": "residual", "_pending": "residual", "queries": "query_window",
                "rope_offset": "positions", "_code_blocks": "records"}  # the codes a recording cache keeps
# Layer attributes that hold what the configuration fixes (projections, bases), whatever the tokens.
_FIXED_ATTRIBUTES = ("compressor", "runtime", "basis", "value_codec")


def _at16(t: Tensor, storage_bytes: int) -> int:
    if t.is_floating_point() and t.element_size() > 2:
        return storage_bytes // t.element_size() * 2
    return storage_bytes


@dataclass
class CacheBytes:
    """Bytes per token seen (per batch row), by part; `fixed_bytes` in all (not per token)."""

    held: dict[str, float]
    at16: dict[str, float]
    bookkeeping_parts: dict[str, float]  # held, by part of `BOOKKEEPING_PARTS`
    bookkeeping_at16: float
    fixed_bytes: int
    full16: float  # a 16-bit full cache: 2 (K, V) x layers x KV heads x head_dim x 2 bytes
    tokens_seen: int

    @property
    def bookkeeping(self) -> float:
        return sum(self.bookkeeping_parts.values())

    @property
    def total_held(self) -> float:
        return sum(self.held.values())

    @property
    def total_at16(self) -> float:
        return sum(self.at16.values())

    @property
    def fraction(self) -> float:
        """Key and value bytes (16-bit equivalent) over a 16-bit full cache's, per token seen."""
        return self.total_at16 / self.full16

    @property
    def fraction_all(self) -> float:
        """Everything the cache holds per token seen (bookkeeping included) over a 16-bit full cache's."""
        return (self.total_at16 + self.bookkeeping_at16) / self.full16

    def to_dict(self) -> dict[str, float]:
        out = {f"bytes_{part}": self.at16.get(part, 0.0) for part in PARTS}
        out.update({f"bytes_{part}": self.bookkeeping_parts.get(part, 0.0) for part in BOOKKEEPING_PARTS})
        out.update(bytes_per_token=self.total_at16, bytes_per_token_held=self.total_held,
                   bytes_bookkeeping=self.bookkeeping, bytes_fixed=float(self.fixed_bytes), bytes_full16=self.full16,
                   cache_fraction=self.fraction, cache_fraction_all=self.fraction_all)
        return out


def full16_bytes_per_token(model_config) -> float:
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    return 2.0 * model_config.num_hidden_layers * kv_heads * head_dim * 2


def held_tensors(cache) -> Iterator[tuple[str, Tensor]]:
    """Every tensor `cache` (a `CompressedCache` or a transformers `DynamicCache`) holds for the tokens it has seen,
    with its part. A stored-state field or layer attribute of no known part is an error, not a silent omission."""
    for layer in cache.layers:
        stored = getattr(layer, "stored", None)
        if stored is not None:
            yield from _stored_tensors(stored, layer.layer_idx)
        for name, part in _LAYER_PARTS.items():
            yield from ((part, t) for t in _tensors_in(getattr(layer, name, None)))
        for record in getattr(layer, "records", ()):
            yield "records", record.kept


def _stored_tensors(stored, layer_idx: int) -> Iterator[tuple[str, Tensor]]:
    for name, value in vars(stored).items():
        if hasattr(value, "recent"):  # a TokenStore: encoded archive + full-precision recent tokens
            for key, t in (value.archive or {}).items():
                if key not in _ARCHIVE_PARTS:
                    raise ValueError(f"cache_bytes: archive entry {key!r} of layer {layer_idx} has no part")
                yield _ARCHIVE_PARTS[key], t
            yield "residual", value.recent
        elif name in _FIELD_PARTS:
            yield from ((_FIELD_PARTS[name], t) for t in _tensors_in(value))
        elif value is not None:
            raise ValueError(f"cache_bytes: field {name!r} of layer {layer_idx}'s store has no part")


def _tensors_in(value) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)


def fixed_tensors(cache) -> Iterator[Tensor]:
    """Tensors the cache's layers hold that the configuration fixes (projections, bases), outside the model."""
    seen: set[int] = set()
    for layer in cache.layers:
        for name in _FIXED_ATTRIBUTES:
            yield from _reachable(getattr(layer, name, None), seen)


def _reachable(obj, seen: set[int]) -> Iterator[Tensor]:
    if obj is None or id(obj) in seen or isinstance(obj, (torch.nn.Module, type, str, int, float, bool)):
        return
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        yield obj
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        children = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
        children += [getattr(obj, "__self__", None)] + [c.cell_contents for c in getattr(obj, "__closure__", None) or ()]
    for child in children:
        yield from _reachable(child, seen)


def _storage_key(t: Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def cache_bytes(cache, model_config) -> CacheBytes:
    """Break down the bytes `cache` (a `CompressedCache` or a transformers `DynamicCache`) holds per token seen."""
    held: dict[str, float] = defaultdict(float)
    at16: dict[str, float] = defaultdict(float)
    counted: set[tuple[int, int]] = set()
    for part, t in held_tensors(cache):
        key = _storage_key(t)
        if key in counted:
            continue
        counted.add(key)
        held[part] += key[1]
        at16[part] += _at16(t, key[1])
    fixed = 0
    for t in fixed_tensors(cache):
        key = _storage_key(t)
        if key not in counted:
            counted.add(key)
            fixed += key[1]
    rows, seen = _rows_and_seen(cache)
    per = float(rows * seen)
    return CacheBytes(
        held={k: held[k] / per for k in PARTS if k in held},
        at16={k: at16[k] / per for k in PARTS if k in at16},
        bookkeeping_parts={k: held[k] / per for k in BOOKKEEPING_PARTS if k in held},
        bookkeeping_at16=sum(at16[k] for k in BOOKKEEPING_PARTS) / per,
        fixed_bytes=fixed,
        full16=full16_bytes_per_token(model_config),
        tokens_seen=seen,
    )


def _rows_and_seen(cache) -> tuple[int, int]:
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and layer.get_seq_length() > 0:
            return keys.shape[0], layer.get_seq_length()
    raise ValueError("cache_bytes: the cache has seen no token")


def tada_bits_per_element(bits: float, group_size: int, kv_heads: int, mean_bits: float = 16.0,
                          scale_bits: float = 16.0) -> float:
    """Bits one cached element costs under TaDA: codes, a scale and a zero point per group, and the per-token
    mean over KV heads (``head_dim`` numbers shared by ``kv_heads`` heads)."""
    return bits + 2 * scale_bits / group_size + mean_bits / kv_heads


def reduction_scenarios(kv_heads: int, head_dim: int, rank: int = 16) -> list[dict[str, float | str]]:
    """What it takes to hold >= 8x fewer bytes than a 16-bit cache: bits per cached element and the reduction
    of storage options, alone and with eviction (`keep`: the fraction of tokens kept). Pure arithmetic on the
    model's KV shape; TaDA groups of 32 (of `rank` for low-rank coefficients when smaller)."""
    def tada(bits: float, mean_bits: float = 16.0, group: int = 32) -> float:
        return tada_bits_per_element(bits, group, kv_heads, mean_bits=mean_bits)

    def row(name: str, bits_k: float, bits_v: float, keep: float = 1.0) -> dict[str, float | str]:
        bits = (bits_k + bits_v) / 2 * keep
        return {"scenario": name, "bits_per_element": bits, "fraction_of_16bit": bits / 16, "reduction": 16 / bits}

    low = rank / head_dim  # coefficients per original element
    group = min(32, rank)
    return [
        row("TaDA 4-bit (fp16 mean per token)", tada(4), tada(4)),
        row("TaDA 4-bit + 50% eviction", tada(4), tada(4), 0.5),
        row("TaDA 4-bit, 8-bit mean + 50% eviction", tada(4, 8), tada(4, 8), 0.5),
        row("TaDA 4-bit, mean shared by 8 tokens + 50% eviction", tada(4, 2), tada(4, 2), 0.5),
        row("4-bit without a mean + 50% eviction", tada(4, 0), tada(4, 0), 0.5),
        row("keys 4-bit, values 2-bit, no mean + 50% eviction", tada(4, 0), tada(2, 0), 0.5),
        row("TaDA 4-bit + 75% eviction", tada(4), tada(4), 0.25),
        row(f"rank {rank} of {head_dim}, 16-bit coefficients", 16 * low, 16 * low),
        row(f"rank {rank} of {head_dim}, 16-bit coefficients + 50% eviction", 16 * low, 16 * low, 0.5),
        row(f"rank {rank} of {head_dim}, TaDA 4-bit coefficients", low * tada(4, group=group),
            low * tada(4, group=group)),
        row("87.5% eviction, 16-bit", 16, 16, 0.125),
    ]
