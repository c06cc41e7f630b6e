"""`CompressedCache`: a transformers 5.x `Cache` whose layers compress their keys and values.

The rules it follows (docs/architecture.md#the-cache-and-transformers): `update` returns every stored key plus the
new ones for the current forward, so the current queries see everything; compression happens *after* that
forward's attention (the registered ``kvtrain`` attention function calls back into the layer), on the stored set
only. `get_seq_length` counts tokens seen (RoPE positions and `generate`'s prompt slicing depend on it);
`get_mask_sizes` describes exactly the keys `update` returns. Positions stay absolute: keys are stored post-RoPE
and never re-rotated.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from kvtrain.config import KVCompressionConfig
from kvtrain.models.rope import model_rope
from kvtrain.models.shape import check_supported, sliding_windows
from kvtrain.runtime.attention import attend_with_stored, key_validity
from kvtrain.runtime.compressor import (
    EventRecord,
    LayerCodecs,
    LayerCodes,
    LayerCompressor,
    LayerPairs,
    StoredKV,
    build_compressors,
    discrete_sides,
)
from kvtrain.runtime.layer import AttendingLayer
from kvtrain.runtime.routing import attention_modules, use_kvtrain_attention
from kvtrain.runtime.sals.layer import SalsLayer
from kvtrain.runtime.sals.runtime import SalsRuntime
from kvtrain.runtime.schedule import EventClock

logger = logging.getLogger("kvtrain")


class CompressedLayer(AttendingLayer):
    """One layer's compressed KV store (a dense layer when `compressor` is None)."""

    def __init__(
        self, layer_idx: int, module: torch.nn.Module, compressor: LayerCompressor | None, record: bool,
        notices: "Notices",
    ):
        super().__init__(layer_idx, module)
        self.notices = notices
        self.compressor = compressor
        self.record = record
        self._reset_state()

    def _reset_state(self) -> None:
        self.stored: StoredKV | None = None
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.clock = EventClock(self.compressor.policy.schedule) if self.compressor is not None else None
        self.last_event_position = -1
        self.queries: Tensor | None = None  # rolling window of the last post-RoPE queries [b, h_q, w, d]
        self.rope_offset: Tensor | None = None  # left-pad count per row
        self._pending: tuple[Tensor, Tensor] | None = None
        self._code_blocks: dict[str, list] = {}  # record=True: per discrete side, each event's fresh encodings

    # ------------------------------------------------------------------ CacheLayerMixin API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        compressor = self.compressor
        self.stored = StoredKV.empty(
            key_states,
            merging=compressor is not None and compressor.merger is not None,
            codecs=compressor.codecs if compressor is not None else LayerCodecs(),
            straight_through=False,
        )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _visible(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        return (
            torch.cat([self.stored.keys, key_states], dim=2),
            torch.cat([self.stored.values, value_states], dim=2),
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if self.stored is None else self.stored.length
        return stored + query_length, self.seen - stored

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped: evicted tokens are gone")

    # ------------------------------------------------------------------ called by the attention function
    def attend(
        self, query: Tensor, attention_mask: Tensor | None, scaling: float, position_ids: Tensor | None = None
    ) -> Tensor:
        """Attention of this forward's queries over stored + new keys, then store and maybe compress.

        Post-RoPE keys need no `position_ids` (SALS layers un-rotate with them).
        """
        new_keys, new_values = self._pending
        new_valid = key_validity(attention_mask, new_keys.shape[2], batch=query.shape[0], device=query.device)
        out = attend_with_stored(
            query,
            self.stored.keys,
            self.stored.values,
            self.stored.attention_bias(),
            new_keys,
            new_values,
            new_valid,
            scaling,
        )
        self._after_attention(query, new_valid, scaling)
        return out

    def _after_attention(self, query: Tensor, new_valid: Tensor, scaling: float) -> None:
        new_keys, new_values = self._pending
        self._pending = None
        q_len = new_keys.shape[2]
        first = self.seen
        self.stored = self.stored.append(new_keys, new_values, first, new_valid)
        self.seen += q_len
        pads = (~new_valid).sum(dim=1)
        self.rope_offset = pads if self.rope_offset is None else self.rope_offset + pads
        if self.compressor is None:
            self._sync()
            return
        window = self.compressor.policy.query_window
        queries = query if self.queries is None else torch.cat([self.queries, query], dim=2)
        trimmed = queries.shape[2] > window
        # A copy when trimmed: the view would keep every query of the forward alive (all of a prefill's).
        self.queries = queries[:, :, -window:].detach().clone() if trimmed else queries.detach()
        if self.clock.tick(q_len):
            n_window = self.queries.shape[2]
            positions = torch.arange(self.seen - n_window, self.seen, device=query.device)
            self.stored, record = self.compressor(
                self.stored,
                self.queries,
                positions,
                self.rope_offset,
                tokens_seen=self.seen,
                last_event_position=self.last_event_position,
                scaling=scaling,
            )
            self.last_event_position = self.seen - 1
            if record is None and q_len > 1 and self.layer_idx == self.notices.first_compressed_layer:
                self.notices.say_once(
                    f"budget {self.compressor.policy.budget_at(self.seen)} >= the {self.seen} tokens seen: "
                    "nothing is compressed at prefill"
                )
            if record is not None and self.record:
                self.records.append(record)
            for side in discrete_sides(self.compressor.codecs):
                store = self.stored.store(side)
                if self.record:
                    self._code_blocks.setdefault(side, []).append(store.fresh)
                store.fresh = None  # read once here: the store holds no second copy of what it archived
        self._sync()

    @property
    def codes(self) -> LayerCodes | None:
        """Per side with a discrete codec, everything it encoded, positions 0.. in order (record=True): what a
        replay of this layer needs to archive exactly the values this cache attended. None without such a side."""
        if not self._code_blocks:
            return None
        return {side: {name: torch.cat([block[name] for block in blocks], dim=2) for name in blocks[0]}
                for side, blocks in self._code_blocks.items()}

    def _sync(self) -> None:
        # transformers reads `keys`/`values` only for offloading and bookkeeping; the stores are the truth.
        self.keys, self.values = self.stored.key_store.recent, self.stored.value_store.recent


_SAID: set[str] = set()


class Notices:
    """Messages said once per process, however many layers, steps and caches run into them."""

    def __init__(self, first_compressed_layer: int | None):
        self.first_compressed_layer = first_compressed_layer

    def say_once(self, message: str) -> None:
        if message not in _SAID:
            _SAID.add(message)
            logger.warning(message)


class CompressedCache(Cache):
    """A `Cache` of `CompressedLayer`s configured by a `KVCompressionConfig`.

    Use `CompressedCache.for_model(model, config)`, which also switches the model to the ``kvtrain``
    attention function, and pass it to `model.generate(past_key_values=cache)` or to forward calls.
    `projections` (per layer key and value `LowRankPair`s) replaces the pairs of `config.lowrank.projections`:
    training passes the projections it learns, with no file in between.
    """

    def __init__(self, config: KVCompressionConfig, model_config, *, record: bool = False, model=None,
                 projections: LayerPairs | None = None):
        if model is None:
            raise ValueError("build the cache with CompressedCache.for_model(model, config): its layers attend "
                             "through the model's attention modules")
        self.compression_config = config
        compressors = build_compressors(config, model, projections=projections)
        compressed = [i for i, c in enumerate(compressors) if c is not None]
        notices = Notices(compressed[0] if compressed else None)
        modules = _modules_by_layer(model)
        layers = [CompressedLayer(i, modules[i], c, record, notices) for i, c in enumerate(compressors)]
        if config.sals is not None:
            runtime = SalsRuntime.build(config, model_config, model_rope(model))
            layers = [SalsLayer(i, modules[i], c, runtime, record) if c is not None else layer
                      for i, (c, layer) in enumerate(zip(compressors, layers))]
        for layer, window in zip(layers, sliding_windows(model_config)):
            layer.sliding_window = window
        super().__init__(layers=layers)

    @classmethod
    def for_model(cls, model, config: KVCompressionConfig, *, record: bool = False,
                  projections: LayerPairs | None = None) -> "CompressedCache":
        if not isinstance(config, KVCompressionConfig):
            raise TypeError(f"CompressedCache.for_model: config must be a KVCompressionConfig, not "
                            f"{type(config).__name__} {config!r} (e.g. KVCompressionConfig(budget=64, "
                            "scorer=ScorerConfig('snapkv')), or KVCompressionConfig.load(path))")
        check_supported(model.config)
        use_kvtrain_attention(model)
        return cls(config, model.config, record=record, model=model, projections=projections)

    @property
    def records(self) -> list[list[EventRecord]]:
        """Per layer, the kept positions after each compression event (when built with record=True)."""
        return [layer.records for layer in self.layers]

    @property
    def codes(self) -> list[LayerCodes | None]:
        """Per layer, what its discrete codecs (TaDA) encoded (when built with record=True): replay with these and
        the `records` archives the very values this cache attended (`replay_compression(..., codes=...)`)."""
        return [layer.codes if isinstance(layer, CompressedLayer) else None for layer in self.layers]

    def stored_tokens(self) -> list[Tensor]:
        """Per layer, the number of valid stored tokens per (row, KV head): [b, h_kv] each."""
        return [layer.stored.valid.sum(dim=2) for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes held by the stored keys and values (the cache itself, not policy bookkeeping)."""
        return sum(layer.stored.nbytes for layer in self.layers if layer.stored is not None)


def _modules_by_layer(model) -> dict[int, torch.nn.Module]:
    modules = {}
    for module in attention_modules(model):
        if module.layer_idx in modules:
            raise ValueError(f"{type(model).__name__}: two attention modules claim layer_idx={module.layer_idx}")
        modules[module.layer_idx] = module
    return modules
