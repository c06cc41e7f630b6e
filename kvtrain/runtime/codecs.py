"""How archived tokens are encoded: low-rank coefficients (`LowRankCodec`), TaDA-packed deviations (`TadaCodec`),
or both (`ChainCodec`). A codec's `roundtrip` is what replay uses instead of the encoded form: the same values,
with a straight-through gradient where encoding is not differentiable.

A *discrete* codec (TaDA codes) rounds: two computations of the same tokens that differ in their last bits (a
step-by-step decode and a batched training forward) can land on different codes, one quantisation step apart. So
a cache that records for training keeps what it encoded, and replay decodes that (`replay_from`) instead of
encoding its own values again: the values attended are then the sampler's, whatever the arithmetic."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from kvtrain.artifacts.projections import LowRankPair
from kvtrain.quant.packing import PackedTensor
from kvtrain.quant.tada import TadaTensor, tada_dequantize, tada_quantize

Encoded = dict[str, Tensor]  # every tensor has the token axis at dim 2


class Codec(ABC):
    """encode: [b, h, n, d] -> Encoded; decode: Encoded -> [b, h, n, d] (the values attention uses)."""

    # Encoded tensors whose head axis has size 1 (shared by all heads): gathering them needs one index set.
    shared_across_heads: frozenset[str] = frozenset()
    # Whether encoding rounds to codes (see the module docstring); a continuous codec's encodings of two nearly
    # equal inputs are nearly equal, so replay can encode its own values.
    discrete: bool = False

    @abstractmethod
    def encode(self, x: Tensor) -> Encoded: ...

    @abstractmethod
    def decode(self, encoded: Encoded, dtype: torch.dtype) -> Tensor: ...

    def roundtrip(self, x: Tensor) -> Tensor:
        """decode(encode(x)) with the gradient of the identity where encoding is not differentiable."""
        return self.decode(self.encode(x), x.dtype)

    def replay_from(self, x: Tensor, encoded: Encoded) -> Tensor:
        """The values a cache held for the tokens `x` (`encoded`, what it encoded from its own computation of them),
        with `roundtrip`'s gradient with respect to `x`. Only discrete codecs record encodings."""
        raise TypeError(f"{type(self).__name__} is continuous: replay encodes its own values (roundtrip)")


@dataclass
class LowRankCodec(Codec):
    """Keys: coefficients c = A^T k and effective keys B c, so that q . (B c) = (B^T q) . (A^T k) exactly as
    KQ-SVD attends. Values: c = A_v^T v and v^ = B_v c, which equals folding B_v into o_proj."""

    pair: LowRankPair  # a, b: [h_kv, d, r]

    def encode(self, x: Tensor) -> Encoded:
        return {"coef": torch.einsum("bhnd,hdr->bhnr", x, self.pair.a.to(x.dtype))}

    def decode(self, encoded: Encoded, dtype: torch.dtype) -> Tensor:
        return torch.einsum("bhnr,hdr->bhnd", encoded["coef"], self.pair.b.to(encoded["coef"].dtype)).to(dtype)


@dataclass
class TadaCodec(Codec):
    """TaDA: the per-token mean over KV heads in fp16, deviations group-quantised and bit-packed."""

    bits: int
    group_size: int
    shared_across_heads = frozenset({"mean"})
    discrete = True

    def encode(self, x: Tensor) -> Encoded:
        t = tada_quantize(x, self.bits, self.group_size)
        d = t.deviation
        return {"mean": t.mean, "codes": d.codes, "scale": d.scale, "zero": d.zero}

    def decode(self, encoded: Encoded, dtype: torch.dtype) -> Tensor:
        deviation = PackedTensor(encoded["codes"], encoded["scale"], encoded["zero"], self.bits, self.group_size)
        return tada_dequantize(TadaTensor(encoded["mean"], deviation), dtype)

    def roundtrip(self, x: Tensor) -> Tensor:
        return x + (super().roundtrip(x.detach()) - x).detach()

    def replay_from(self, x: Tensor, encoded: Encoded) -> Tensor:
        return x + (self.decode(encoded, x.dtype) - x).detach()


@dataclass
class ChainCodec(Codec):
    """Low-rank coefficients, then quantised: encode outer(inner(x)), decode inner(outer(...))."""

    inner: LowRankCodec
    outer: TadaCodec

    @property
    def shared_across_heads(self) -> frozenset[str]:
        return self.outer.shared_across_heads

    @property
    def discrete(self) -> bool:
        return self.outer.discrete

    def encode(self, x: Tensor) -> Encoded:
        return self.outer.encode(self.inner.encode(x)["coef"])

    def decode(self, encoded: Encoded, dtype: torch.dtype) -> Tensor:
        return self.inner.decode({"coef": self.outer.decode(encoded, dtype)}, dtype)

    def roundtrip(self, x: Tensor) -> Tensor:
        coef = self.inner.encode(x)["coef"]
        return self.inner.decode({"coef": self.outer.roundtrip(coef)}, x.dtype)

    def replay_from(self, x: Tensor, encoded: Encoded) -> Tensor:
        coef = self.inner.encode(x)["coef"]
        return self.inner.decode({"coef": self.outer.replay_from(coef, encoded)}, x.dtype)
