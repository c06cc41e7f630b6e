"""Where a compressed cache's bytes go: codes, scales, means, low-rank coefficients, full-precision tokens,
bookkeeping, measured on the tensors a `CompressedCache` holds.

Two counts per part: ``held`` (the tensors as they are, e.g. fp32 residual tokens when the model runs in fp32)
and ``at16`` (as a 16-bit model would hold them: tensors stored in the model's floating dtype counted at 2 bytes
per element; packed codes and the fp16 TaDA means, scales and zero points as they are). Quality-vs-memory
comparisons use ``at16`` against a 16-bit full cache, so a run in fp32 on CPU reports what deployment in
bf16/fp16 would hold. Bookkeeping (positions, validity, votes, policy state) is not part of
`CompressedCache.nbytes()`; it is listed separately and left out of the fractions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import Tensor

# TokenStore archive entry -> part; a name not listed here is an error (a new codec must say where it belongs).
_ARCHIVE_PARTS = {"codes": "codes", "scale": "scales", "zero": "scales", "mean": "means", "coef": "lowrank_coef",
                  "x": "residual"}
PARTS = ("codes", "scales", "means", "lowrank_coef", "residual")
_BOOKKEEPING = {"positions", "valid", "has_history", "log_votes", "token_valid", "state"}


def _at16(t: Tensor) -> int:
    if t.is_floating_point() and t.element_size() > 2:
        return t.numel() * 2
    return t.numel() * t.element_size()


@dataclass
class CacheBytes:
    """Bytes per token seen (per batch row), by part."""

    held: dict[str, float]
    at16: dict[str, float]
    bookkeeping: float
    full16: float  # a 16-bit full cache: 2 (K, V) x layers x KV heads x head_dim x 2 bytes
    tokens_seen: int

    @property
    def total_held(self) -> float:
        return sum(self.held.values())

    @property
    def total_at16(self) -> float:
        return sum(self.at16.values())

    @property
    def fraction(self) -> float:
        """Cache bytes (16-bit equivalent) over a 16-bit full cache's, per token seen."""
        return self.total_at16 / self.full16

    def to_dict(self) -> dict[str, float]:
        out = {f"bytes_{part}": self.at16.get(part, 0.0) for part in PARTS}
        out.update(bytes_per_token=self.total_at16, bytes_per_token_held=self.total_held,
                   bytes_bookkeeping=self.bookkeeping, bytes_full16=self.full16, cache_fraction=self.fraction)
        return out


def full16_bytes_per_token(model_config) -> float:
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    return 2.0 * model_config.num_hidden_layers * kv_heads * head_dim * 2


def cache_bytes(cache, model_config) -> CacheBytes:
    """Break down the bytes `cache` (a `CompressedCache` or a transformers `DynamicCache`) holds per token seen."""
    held: dict[str, float] = defaultdict(float)
    at16: dict[str, float] = defaultdict(float)
    bookkeeping = 0.0
    rows = seen = None
    for layer in cache.layers:
        stored = getattr(layer, "stored", None)
        if stored is None:  # a transformers layer (DynamicCache): keys and values in full precision
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            for t in (layer.keys, layer.values):
                held["residual"] += t.nbytes
                at16["residual"] += _at16(t)
            rows, seen = layer.keys.shape[0], layer.get_seq_length()
            continue
        rows, seen = stored.valid.shape[0], layer.get_seq_length()
        for name, value in vars(stored).items():
            if name in _BOOKKEEPING:
                tensors = value.values() if isinstance(value, dict) else [value]
                bookkeeping += sum(t.nbytes for t in tensors if t is not None)
            elif isinstance(value, Tensor):  # SALS latents: low-rank keys
                held["lowrank_coef"] += value.nbytes
                at16["lowrank_coef"] += _at16(value)
            else:  # a TokenStore: encoded archive + full-precision recent tokens
                for key, t in (value.archive or {}).items():
                    if key not in _ARCHIVE_PARTS:
                        raise ValueError(f"cache_bytes: archive entry {key!r} of layer {layer.layer_idx} has no part")
                    held[_ARCHIVE_PARTS[key]] += t.nbytes
                    at16[_ARCHIVE_PARTS[key]] += _at16(t)
                held["residual"] += value.recent.nbytes
                at16["residual"] += _at16(value.recent)
    if not seen:
        raise ValueError("cache_bytes: the cache has seen no token")
    per = float(rows * seen)
    return CacheBytes(
        held={k: v / per for k, v in held.items()},
        at16={k: v / per for k, v in at16.items()},
        bookkeeping=bookkeeping / per,
        full16=full16_bytes_per_token(model_config),
        tokens_seen=seen,
    )


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
