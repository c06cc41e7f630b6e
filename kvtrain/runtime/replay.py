"""Replay: the compressed cache's attention pattern, reproduced in one teacher-forced forward.

Inside `replay_compression(model, config, prefill_len=P)`, every attention layer of a full-sequence
forward simulates the cache's schedule on that layer's own queries, keys and values: events after each
prefill chunk and every `interval` decode steps, each applying the *same* `LayerCompressor` to the same
candidates and query window that the cache would hold. Queries between two events attend the keep-set of
the earlier event plus the causal keys since it. Keep-sets are index lists (per event, row and KV head);
no S x S mask is ever built.

With `keep_sets=` (the `records` of the `CompressedCache` that sampled these very tokens) the events keep the
recorded positions instead of selecting again (`LayerCompressor.apply_recorded`): the forward then attends
exactly what the sampling cache attended, whatever the weights are now. That is what training on sampled
rollouts needs (GRPO): selection recomputed from this forward's own queries could flip near-ties, and after an
update it would select for another policy than the one that sampled. Quantisation codes could flip the same way, so
where a codec rounds (TaDA) the replay also takes the cache's `codes` and archives those values (straight-through
gradient to this forward's own keys and values).

Gradients flow through the kept keys and values, not through selection (nor through KeepKV's log votes, which
both attention paths treat as constants).

The replay is bound to the model's attention modules as their route (`kvtrain.runtime.routing`), not to the
calling thread: gradient checkpointing recomputes a layer's forward during backward (on CUDA, in autograd's
device thread), and that recomputation must attend exactly as the forward did. So keep the block open over
forward *and* backward, and run other forwards of the same modules (e.g. an adapter-disabled teacher) inside
`replay_disabled(model)`. Selection is deterministic, so a recomputed layer reproduces its keep-sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kvtrain import kernels
from kvtrain.config import KVCompressionConfig, ScheduleConfig
from kvtrain.kernels.dispatch import use_kernels
from kvtrain.models.rope import model_rope
from kvtrain.models.shape import check_supported, check_window, sliding_windows
from kvtrain.runtime.attention import attend_with_stored, key_validity
from kvtrain.runtime.compressor import (
    SIDES,
    EventRecord,
    LayerCodecs,
    LayerCodes,
    LayerCompressor,
    LayerPairs,
    StoredKV,
    build_compressors,
    discrete_sides,
)
from kvtrain.runtime.routing import Route, routed, use_kvtrain_attention
from kvtrain.runtime.sals.replay import sals_replay_attention
from kvtrain.runtime.sals.runtime import SalsRuntime
from kvtrain.runtime.schedule import event_points


@dataclass
class Replay(Route):
    """The state of one replayed forward: per-layer compressors and, when asked, their records."""

    compressors: list[LayerCompressor | None]
    schedule: ScheduleConfig
    prefill_len: int
    record: bool
    records: list[list[EventRecord]] = field(default_factory=list)
    sals: SalsRuntime | None = None  # set for a SALS config: its non-dense layers attend by `sals_replay_attention`
    sliding_windows: list[int | None] | None = None  # the model's per-layer windows (None: all full attention)
    keep_sets: list[list[EventRecord]] | None = None  # per layer, recorded events to apply instead of selecting
    codes: list[LayerCodes | None] | None = None  # per layer, the recording cache's codes (with keep_sets)

    def __post_init__(self) -> None:
        self.records = [[] for _ in self.compressors]

    def __call__(self, module, query, key, value, attention_mask, scaling, position_ids) -> Tensor:
        return self.attend(module.layer_idx, query, key, value, attention_mask, scaling, position_ids)

    def attend(
        self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, scaling: float,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Attention of a whole teacher-forced sequence under the replayed keep-sets: [b, h_q, S, d_v].

        query [b, h_q, S, d]; key, value [b, h_kv, S, d]. The events are simulated first (they depend on q/k/v,
        never on this layer's output); then one `keyset_attention` call (when `use_kernels`) or a loop over
        the intervals attends them. SALS layers use `position_ids` (RoPE positions) instead.
        """
        b, _, seq_len, _ = query.shape
        if seq_len < self.prefill_len:
            raise ValueError(f"replay got a {seq_len}-token sequence but prefill_len={self.prefill_len}")
        if self.sliding_windows is not None:
            check_window(self.sliding_windows[layer_idx], layer_idx, seq_len, "replay_compression")
        if self.sals is not None and self.compressors[layer_idx] is not None:
            return sals_replay_attention(self.sals, layer_idx, self.compressors[layer_idx], self.prefill_len, query,
                                         key, value, attention_mask, scaling, position_ids)
        valid = key_validity(attention_mask, seq_len, batch=b, device=query.device)
        keysets = self.simulate(layer_idx, query, key, value, valid, scaling)
        if use_kernels(query.device):
            return _keyset_kernel_attention(query, key, value, valid, keysets, scaling)
        bounds = [ks.start for ks in keysets] + [seq_len]
        return torch.cat(
            [
                attend_with_stored(
                    query[:, :, start:end],
                    ks.keys,
                    ks.values,
                    ks.bias,
                    key[:, :, start:end],
                    value[:, :, start:end],
                    valid[:, start:end],
                    scaling,
                )
                for ks, start, end in zip(keysets, bounds, bounds[1:])
            ],
            dim=2,
        )

    def simulate(
        self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, valid: Tensor, scaling: float
    ) -> list["KeySet"]:
        """Run the layer's events; one `KeySet` per interval (the first is empty), in order of `start`.

        Records the kept positions (replacing the layer's previous ones, so that a checkpointed layer
        recomputed in backward does not record its events twice) when the replay was asked to.
        """
        seq_len = query.shape[2]
        compressor = self.compressors[layer_idx]
        points = event_points(self.schedule, self.prefill_len, seq_len) if compressor is not None else []
        stored = StoredKV.empty(
            key,
            merging=compressor is not None and compressor.merger is not None,
            codecs=compressor.codecs if compressor is not None else LayerCodecs(),
            straight_through=True,
        )
        window = compressor.policy.query_window if compressor is not None else 0
        rope_offset = (~valid[:, : self.prefill_len]).sum(dim=1)
        recorded = self._recorded(layer_idx, points, seq_len, query.shape[0]) if self.keep_sets is not None else None
        keysets = [KeySet.of(stored, 0)]
        records = []
        last_event = -1
        for start, end in zip([0] + points, points):
            stored = stored.append(key[:, :, start:end], value[:, :, start:end], start, valid[:, start:end])
            first_query = max(0, end - window)
            event = dict(
                queries=query[:, :, first_query:end],
                query_positions=torch.arange(first_query, end, device=query.device),
                rope_offset=rope_offset,
                tokens_seen=end,
                last_event_position=last_event,
                scaling=scaling,
            )
            if recorded is None:
                stored, record = compressor(stored, **event)
            else:
                stored, record = compressor.apply_recorded(stored, recorded.get(end), valid[:, :end],
                                                           codes=self._codes_between(layer_idx, start, end), **event)
            last_event = end - 1
            keysets.append(KeySet.of(stored, end))
            if record is not None:
                records.append(record)
        if self.record:
            self.records[layer_idx] = records
        return keysets

    def _codes_between(self, layer_idx: int, start: int, end: int) -> LayerCodes | None:
        """The recorded codes of positions start..end-1 (the tokens an event at `end` archives), per side."""
        layer_codes = self.codes[layer_idx] if self.codes is not None else None
        if layer_codes is None:
            return None
        block = {}
        for side, encoded in layer_codes.items():
            recorded = next(iter(encoded.values())).shape[2]
            if recorded < end:
                raise ValueError(f"layer {layer_idx}: {side} codes recorded for {recorded} positions, but an event at "
                                 f"{end} tokens seen archives positions {start}..{end - 1}; the codes belong to "
                                 "another sequence or schedule")
            block[side] = {name: t[:, :, start:end] for name, t in encoded.items()}
        return block

    def _recorded(self, layer_idx: int, points: list[int], seq_len: int, batch: int) -> dict[int, Tensor]:
        """The layer's recorded keep-sets by tokens seen, checked against this forward's schedule and batch.

        Events at or after `seq_len` are left out: the sampled sequence may run longer than the trained one
        (a batch is cut after its longest unmasked row)."""
        events = {}
        for record in self.keep_sets[layer_idx]:
            if record.tokens_seen >= seq_len:
                continue
            if record.tokens_seen not in points:
                raise ValueError(
                    f"layer {layer_idx}: a keep-set recorded at {record.tokens_seen} tokens seen, which is not an "
                    f"event of this forward's schedule {points} (prefill_len={self.prefill_len}, "
                    f"interval={self.schedule.interval}); the records belong to another sequence or schedule"
                )
            if record.kept.shape[0] != batch:
                raise ValueError(f"layer {layer_idx}: keep-sets recorded for {record.kept.shape[0]} rows, the "
                                 f"forward has {batch}")
            events[record.tokens_seen] = record.kept
        return events


@dataclass
class KeySet:
    """What the queries of one interval (rows from `start` to the next event) attend besides their own block:
    keys, values [b, h_kv, n, d] and bias [b, h_kv, n] (0 / log votes, -inf = empty slot; no gradient)."""

    start: int
    keys: Tensor
    values: Tensor
    bias: Tensor

    @classmethod
    def of(cls, stored: StoredKV, start: int) -> "KeySet":
        return cls(start, stored.keys, stored.values, stored.attention_bias().detach())


def _keyset_kernel_attention(
    query: Tensor, key: Tensor, value: Tensor, valid: Tensor, keysets: list[KeySet], scaling: float
) -> Tensor:
    """All intervals in one `keyset_attention` call, keep-sets padded to the largest with -inf bias slots."""
    kept = max(ks.keys.shape[2] for ks in keysets)

    def padded(x: Tensor, fill: float) -> Tensor:
        extra = kept - x.shape[2]
        return F.pad(x, (0, 0, 0, extra) if x.dim() == 4 else (0, extra), value=fill)

    return kernels.keyset_attention(
        query,
        key,
        value,
        torch.stack([padded(ks.keys, 0.0) for ks in keysets]),
        torch.stack([padded(ks.values, 0.0) for ks in keysets]),
        torch.stack([padded(ks.bias, float("-inf")) for ks in keysets]),
        [ks.start for ks in keysets],
        scaling,
        key_padding=valid,
        force="triton",
    )


@contextlib.contextmanager
def replay_compression(
    model, config: KVCompressionConfig, *, prefill_len: int, record: bool = False, projections: LayerPairs | None = None,
    keep_sets: list[list[EventRecord]] | None = None, codes: list[LayerCodes | None] | None = None,
) -> Iterator[Replay]:
    """Within this block, full-sequence forwards of `model` attend as the compressed cache would.

    `prefill_len` is the number of tokens the cache would have received in multi-token (prefill)
    forwards; every later token counts as one decode step. Yields the `Replay`, whose `records` hold
    the kept positions per layer and event of the latest forward when `record=True`. With gradient
    checkpointing, run the backward pass inside the block too (see the module docstring). `projections`
    (per layer key and value `LowRankPair`s) replaces the pairs of `config.lowrank.projections`: training
    passes the projections it learns. `keep_sets` (per layer, the `EventRecord`s of the cache that sampled
    the forward's tokens, rows in the same order: `CompressedCache.records`) makes every event keep the
    recorded positions instead of selecting; the forward must then have the sampled sequence's prefill length.
    `codes` (that cache's `codes`) is required with `keep_sets` when a codec rounds (TaDA): the events then archive
    the values the cache encoded instead of encoding this forward's own, whose codes could differ by one step.
    """
    check_supported(model.config)
    use_kvtrain_attention(model)
    compressors = build_compressors(config, model, projections=projections)
    if keep_sets is not None:
        _check_keep_sets(keep_sets, compressors, config)
        _check_codes(codes, compressors)
    elif codes is not None:
        raise ValueError("codes without keep_sets: recorded codes belong to the recorded keep-sets of the same cache")
    replay = Replay(
        compressors, config.schedule, prefill_len, record, sliding_windows=sliding_windows(model.config),
        keep_sets=keep_sets, codes=codes,
    )
    if config.sals is not None:
        replay.sals = SalsRuntime.build(config, model.config, model_rope(model))
    with routed(model, replay):
        yield replay


def _check_keep_sets(keep_sets: list[list[EventRecord]], compressors: list[LayerCompressor | None],
                     config: KVCompressionConfig) -> None:
    if config.sals is not None:
        raise ValueError("keep_sets: SALS selects tokens at every decode step, not at compression events; its replay "
                         "has no recorded keep-sets to apply")
    if len(keep_sets) != len(compressors):
        raise ValueError(f"keep_sets holds {len(keep_sets)} layers, the model has {len(compressors)}")
    for i, (records, compressor) in enumerate(zip(keep_sets, compressors)):
        if compressor is None and records:
            raise ValueError(f"keep_sets: layer {i} is dense in this config, but {len(records)} events were recorded "
                             "for it")


def _check_codes(codes: list[LayerCodes | None] | None, compressors: list[LayerCompressor | None]) -> None:
    if codes is not None and len(codes) != len(compressors):
        raise ValueError(f"codes holds {len(codes)} layers, the model has {len(compressors)}")
    for i, compressor in enumerate(compressors):
        needed = discrete_sides(compressor.codecs) if compressor is not None else []
        held = sorted(codes[i]) if codes is not None and codes[i] is not None else []
        if needed != [side for side in SIDES if side in held]:
            raise ValueError(
                f"layer {i}: the config quantises {needed or 'nothing'} and codes were given for {held or 'nothing'}: "
                "replaying recorded keep-sets exactly needs the codes the sampling cache recorded for every "
                "quantised side (codes=cache.codes), since re-quantising this forward's values can flip codes"
            )


@contextlib.contextmanager
def replay_disabled(model) -> Iterator[None]:
    """Within this block, forwards of `model` use full attention even inside `replay_compression`."""
    with routed(model, None):
        yield
