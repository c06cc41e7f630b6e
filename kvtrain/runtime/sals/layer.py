"""`SalsLayer`: a `CompressedCache` layer that holds SALS latent keys (docs/methods.md#sals).

Per token the layer holds one latent ``U_r^T k_pre`` (``[b, n, r]``, all KV heads of the layer jointly), its
value (a `TokenStore`: full precision, or TaDA-packed from the next event on when `quant.value_bits` is
set), its RoPE position (from ``position_ids``, so left padding works as in the other layers) and validity.

* A prefill forward (several tokens) attends every stored token, reconstructed and rotated, plus its own
  tokens exactly: with one prefill chunk that is exact attention.
* A decode step scores the stored latents with the un-rotated query on the leading ``r*`` dims, keeps sinks
  + recent + top-k, reconstructs and rotates only those keys, decodes only those values (`TokenStore.take`),
  and attends them plus its own exact key/value.
* After attention the new tokens' keys are stored as latents; values are archived through their codec after
  each prefill chunk and every ``schedule.interval`` decode steps, as the other layers do.

`update` returns only the new keys and values (nothing else exists in full form); the attention function
then calls `attend`, which reads the latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvtrain.artifacts.sals_basis import SalsBasis
from kvtrain.lowrank.sals import reconstruct_keys
from kvtrain.runtime.attention import attend_with_stored, key_validity
from kvtrain.runtime.compressor import EventRecord, LayerCompressor
from kvtrain.runtime.layer import AttendingLayer
from kvtrain.runtime.sals.runtime import SalsRuntime, recency_scores
from kvtrain.runtime.schedule import EventClock
from kvtrain.runtime.storage import TokenStore


@dataclass
class SalsStore:
    """What a SALS layer holds; dim 1 of ``latents``/``positions``/``token_valid`` is the token axis."""

    latents: Tensor  # [b, n, r]
    value_store: TokenStore  # [b, h_kv, n, d]
    positions: Tensor  # [b, n] RoPE positions
    token_valid: Tensor  # [b, n]

    @property
    def valid(self) -> Tensor:
        """[b, h_kv, n], like `StoredKV.valid` (one token set for all KV heads)."""
        b, n = self.token_valid.shape
        return self.token_valid[:, None].expand(b, self.value_store.recent.shape[1], n)

    @property
    def length(self) -> int:
        return self.latents.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held: r latent numbers per token for the keys, and the (possibly packed) values."""
        return self.latents.nbytes + self.value_store.nbytes


class SalsLayer(AttendingLayer):
    """One layer's SALS store; built by `CompressedCache` for every non-dense layer of a SALS config."""

    def __init__(
        self, layer_idx: int, module: torch.nn.Module, compressor: LayerCompressor, runtime: SalsRuntime, record: bool
    ):
        super().__init__(layer_idx, module)
        if runtime.config.selector == "exact":
            raise ValueError(
                "sals.selector='exact' scores with the uncompressed keys, which a SALS cache does not hold: it is "
                "an oracle for replay (evaluate_loyalty(method='replay')), not a cache mode"
            )
        self.runtime = runtime
        self.value_codec = compressor.codecs.values
        self.schedule = compressor.policy.schedule
        self.record = record
        self._reset_state()

    def _reset_state(self) -> None:
        self.stored: SalsStore | None = None
        self.basis: SalsBasis | None = None
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.clock = EventClock(self.schedule)
        self._pending: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ CacheLayerMixin API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.basis = self.runtime.basis(self.layer_idx, key_states)
        self.stored = SalsStore(
            latents=key_states.new_zeros(b, 0, self.basis.rank),
            value_store=TokenStore(value_states.new_zeros(b, h, 0, d), self.value_codec),
            positions=torch.zeros(b, 0, dtype=torch.long, device=key_states.device),
            token_valid=torch.zeros(b, 0, dtype=torch.bool, device=key_states.device),
        )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _visible(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.seen

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a SALS cache cannot be cropped")

    # ------------------------------------------------------------------ called by the attention function
    def attend(
        self, query: Tensor, attention_mask: Tensor | None, scaling: float, position_ids: Tensor | None = None
    ) -> Tensor:
        """Attention of this forward's queries (see the module docstring), then store the new tokens."""
        if position_ids is None:
            raise ValueError(f"layer {self.layer_idx}: SALS needs the forward's position_ids to undo RoPE")
        new_keys, new_values = self._pending
        b, _, q, _ = query.shape
        positions = position_ids.expand(b, q)
        new_valid = key_validity(attention_mask, q, batch=b, device=query.device)
        stored = self.stored
        if q > 1:
            index = torch.arange(stored.length, device=query.device).expand(b, stored.length)
            keep = stored.token_valid
        else:
            index, keep = self._select(query, positions)
        latents = torch.gather(stored.latents, 1, index[..., None].expand(*index.shape, self.basis.rank))
        keys = reconstruct_keys(latents, self.basis, *self.runtime.rope(torch.gather(stored.positions, 1, index)))
        h_kv = keys.shape[1]
        values = stored.value_store.take(index[:, None, :].expand(b, h_kv, -1))
        bias = torch.zeros(keep.shape, device=query.device).masked_fill(~keep, float("-inf"))
        out = attend_with_stored(
            query, keys, values, bias[:, None].expand(b, h_kv, -1), new_keys, new_values, new_valid, scaling
        )
        self._store(positions, new_valid)
        return out

    def _select(self, query: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The decode step's token set over the stored tokens: (indices [b, K] ascending, kept [b, K])."""
        stored = self.stored
        b, n = stored.token_valid.shape
        if self.runtime.config.selector == "recent":
            scores = recency_scores(b, 1, n, query.device)
        else:
            cos, sin = self.runtime.rope(positions)
            scores = self.runtime.latent_scores(self.basis, query, cos, sin, stored.latents)
        index, keep = self.runtime.select(scores[:, 0], stored.token_valid)
        if self.record:
            kept = index.masked_fill(~keep, -1)[:, None].expand(b, self.stored.value_store.recent.shape[1], -1)
            self.records.append(EventRecord(tokens_seen=self.seen, kept=kept))
        return index, keep

    def _store(self, positions: Tensor, new_valid: Tensor) -> None:
        new_keys, new_values = self._pending
        self._pending = None
        q = new_keys.shape[2]
        cos, sin = self.runtime.rope(positions)
        stored = self.stored
        values = stored.value_store.append(new_values)
        due = self.clock.tick(q)
        self.stored = SalsStore(
            latents=torch.cat([stored.latents, self.runtime.latent_keys(self.basis, new_keys, cos, sin)], dim=1),
            value_store=values.flush() if due else values,
            positions=torch.cat([stored.positions, positions], dim=1),
            token_valid=torch.cat([stored.token_valid, new_valid], dim=1),
        )
        self.seen += q
        # transformers reads `keys`/`values` only for bookkeeping; the store is the truth.
        self.keys, self.values = self.stored.latents, self.stored.value_store.recent
