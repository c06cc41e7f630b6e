"""`AttendingLayer`: the contract of a compressed cache layer, which runs its own attention between `update`
and storing (`CompressedLayer` in `kvtrain.runtime.cache`, `SalsLayer` in `kvtrain.runtime.sals.layer`)."""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from kvtrain.models.shape import check_window
from kvtrain.runtime.compressor import EventRecord
from kvtrain.runtime.routing import Route, bind_route, restore_route


class AttendingLayer(CacheLayerMixin, Route):
    """A cache layer that runs its own attention between `update` and storing.

    `update` binds the layer as its attention module's route (`kvtrain.runtime.routing`) and returns what the
    current forward's attention needs (`_visible`); the registered attention function then calls the layer,
    which unbinds itself and runs `attend` on the queries, the pending keys and values, and whatever the layer
    has stored.
    """

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, layer_idx: int, module: torch.nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.module = module
        self.records: list[EventRecord] = []
        self._displaced: Route | None = None
        self.sliding_window: int | None = None  # the model's window for this layer (None: full attention)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self._pending is not None:
            raise RuntimeError(
                "CompressedCache layer was updated twice without an attention call in between: the model must "
                "use attn_implementation='kvtrain' (call kvtrain.use_kvtrain_attention(model) or build the cache "
                "with CompressedCache.for_model)"
            )
        check_window(self.sliding_window, self.layer_idx, self.get_seq_length() + key_states.shape[2], "CompressedCache")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        self._displaced = bind_route(self.module, self)
        return self._visible(key_states, value_states)

    def __call__(self, module, query, key, value, attention_mask, scaling, position_ids) -> Tensor:
        restore_route(self.module, self._displaced)
        self._displaced = None
        return self.attend(query, attention_mask, scaling, position_ids)

    @abstractmethod
    def _visible(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values `update` hands back to the forward (what transformers sizes the mask by)."""

    @abstractmethod
    def attend(
        self, query: Tensor, attention_mask: Tensor | None, scaling: float, position_ids: Tensor | None = None
    ) -> Tensor:
        """Attention of this forward's queries ``[b, h_q, q, d]`` over the stored and the pending tokens, then
        store the pending ones (and compress when an event is due): ``[b, h_q, q, d_v]``."""

    @abstractmethod
    def _reset_state(self) -> None:
        """Forget everything stored (a fresh layer)."""

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._reset_state()
        self.records = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with CompressedCache")
