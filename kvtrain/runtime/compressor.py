"""One compression event of one layer: score -> protect -> select -> (merge) -> gather.

This is the only place where a policy is applied. `CompressedCache` calls it during decoding and
replay calls it inside a teacher-forced forward, with the same inputs in the same order, which is what
makes replayed logits equal step-by-step decode logits.

`LayerCompressor.apply_recorded` runs an event with a keep-set a cache recorded (`EventRecord.kept`) instead of
scoring and selecting: merging and archiving then act on the given kept set. Training on sampled rollouts uses
it, because selecting again from the training forward's own queries and keys could flip a near-tie (batched and
step-by-step arithmetic round differently) and, once the weights have moved, would select for another policy. For
the same reason it archives with the codes the cache recorded (`LayerCodes`) where a codec rounds (TaDA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kvtrain.artifacts.projections import LowRankPair, read_projections_for_model
from kvtrain.artifacts.quant_plan import QuantPlan, read_quant_plan
from kvtrain.config import ConfigError, KVCompressionConfig, LayerPolicy, LowRankConfig
from kvtrain.models.rope import RopeFn, model_rope
from kvtrain.policies import ScoreInputs, build_scorer
from kvtrain.policies.keepkv import KeepKVMerger
from kvtrain.policies.select import protected_mask, select
from kvtrain.runtime.binding import check_codec_dims, check_config_for_model
from kvtrain.runtime.codecs import ChainCodec, Codec, Encoded, LowRankCodec, TadaCodec
from kvtrain.runtime.storage import TokenStore

_SCORER_STATE = "scorer."
_MERGE_STATE = "merge."
SIDES = ("keys", "values")

# Per side ("keys", "values"), what a recording cache's discrete codec encoded: one `Encoded` whose token axis runs
# over the positions archived so far, in order (every token is encoded once, at the first event after it arrived).
LayerCodes = dict[str, Encoded]


@dataclass
class StoredKV:
    """What one layer holds between events; dim 2 is sorted by position for every (row, KV head)."""

    key_store: TokenStore
    value_store: TokenStore
    positions: Tensor  # [b, h_kv, n] long, -1 for empty slots
    valid: Tensor  # [b, h_kv, n] bool
    has_history: Tensor  # [b, h_kv, n] bool: survived an event
    log_votes: Tensor | None = None  # [b, h_kv, n] when merging
    state: dict[str, Tensor] = field(default_factory=dict)  # per-token policy state, [b, h_kv, n] each

    @classmethod
    def empty(cls, like: Tensor, *, merging: bool, codecs: "LayerCodecs", straight_through: bool) -> "StoredKV":
        b, h, _, d = like.shape
        zeros = like.new_zeros(b, h, 0)
        return cls(
            key_store=TokenStore(like.new_zeros(b, h, 0, d), codecs.keys, straight_through=straight_through),
            value_store=TokenStore(like.new_zeros(b, h, 0, d), codecs.values, straight_through=straight_through),
            positions=zeros.long(),
            valid=zeros.bool(),
            has_history=zeros.bool(),
            log_votes=zeros.float() if merging else None,
        )

    @property
    def keys(self) -> Tensor:
        """[b, h_kv, n, d] as attention sees them (decoded)."""
        return self.key_store.view()

    @property
    def values(self) -> Tensor:
        return self.value_store.view()

    @property
    def length(self) -> int:
        return self.positions.shape[2]

    @property
    def nbytes(self) -> int:
        return self.key_store.nbytes + self.value_store.nbytes

    def store(self, side: str) -> TokenStore:
        return self.key_store if side == "keys" else self.value_store

    def append(self, keys: Tensor, values: Tensor, first_position: int, valid: Tensor) -> "StoredKV":
        """Add new tokens (positions first_position..) after the stored ones; `valid` is [b, q]."""
        b, h, q, _ = keys.shape
        positions = torch.arange(first_position, first_position + q, device=keys.device)
        new_valid = valid[:, None, :].expand(b, h, q)
        votes = None
        if self.log_votes is not None:
            votes = torch.cat([self.log_votes, self.log_votes.new_zeros(b, h, q)], dim=2)
        state = {name: torch.cat([t, t.new_zeros(b, h, q)], dim=2) for name, t in self.state.items()}
        return StoredKV(
            key_store=self.key_store.append(keys),
            value_store=self.value_store.append(values),
            positions=torch.cat([self.positions, positions.expand(b, h, q)], dim=2),
            valid=torch.cat([self.valid, new_valid], dim=2),
            has_history=torch.cat([self.has_history, torch.zeros_like(new_valid)], dim=2),
            log_votes=votes,
            state=state,
        )

    def attention_bias(self) -> Tensor:
        """Additive logit bias over the stored slots: log votes, -inf for empty slots. [b, h_kv, n]."""
        bias = self.log_votes.float() if self.log_votes is not None else torch.zeros(self.valid.shape, device=self.valid.device)
        return bias.masked_fill(~self.valid, float("-inf"))


@dataclass
class LayerCodecs:
    """How a layer archives keys and values (None: full precision)."""

    keys: Codec | None = None
    values: Codec | None = None


@dataclass
class EventRecord:
    """Kept positions after one event: `kept` [b, h_kv, k] (column indices, -1 = empty slot)."""

    tokens_seen: int
    kept: Tensor


def discrete_sides(codecs: LayerCodecs) -> list[str]:
    """The sides whose codec rounds to codes: a recording cache keeps their encodings for exact replay."""
    return [side for side, codec in zip(SIDES, (codecs.keys, codecs.values)) if codec is not None and codec.discrete]


class LayerCompressor:
    """A layer's policy, built once from its `LayerPolicy`, applied at each event. `rope` is the model's rotary
    embedding, handed to scorers that rotate or un-rotate queries (None: the default RoPE of `ScoreInputs`)."""

    def __init__(self, policy: LayerPolicy, codecs: LayerCodecs | None = None, rope: RopeFn | None = None):
        self.policy = policy
        self.codecs = codecs or LayerCodecs()
        self.rope = rope
        self.scorer = build_scorer(policy.scorer.name, policy.scorer.params)
        merge = policy.merge
        self.merger = (
            KeepKVMerger(threshold=merge.threshold, ema_alpha=merge.ema_alpha, max_rescale=merge.max_rescale)
            if merge
            else None
        )

    def __call__(
        self,
        stored: StoredKV,
        queries: Tensor,
        query_positions: Tensor,
        rope_offset: Tensor,
        tokens_seen: int,
        last_event_position: int,
        scaling: float,
    ) -> tuple[StoredKV, EventRecord | None]:
        """Run one event. Returns the new stored set and what was kept (None if nothing was evicted)."""
        policy = self.policy
        inputs = self._inputs(stored, queries, query_positions, rope_offset, last_event_position, scaling)
        # Scoring and selection are discrete decisions: no gradient flows through them, while the kept
        # keys and values (gathered or merged below) stay differentiable for training.
        with torch.no_grad():
            scorer_state = _prefixed(stored.state, _SCORER_STATE)
            scores, scorer_state = self.scorer(_detached(inputs), scorer_state)
            discard = self.scorer.discards(inputs, scores)
        if not self._over_budget(stored, tokens_seen) and (discard is None or not bool(discard.any())):
            # Stateful scorers still account for the queries of this interval, and the recent tokens are
            # archived through the codecs all the same.
            return _flushed(stored, scorer_state), None
        with torch.no_grad():
            protected = protected_mask(
                stored.positions,
                stored.valid,
                sinks=policy.sinks,
                recent=policy.recent,
                seen=tokens_seen,
                whitelist=policy.whitelist,
            )
            candidates = stored.valid if discard is None else stored.valid & (protected | ~discard)
            keep_idx, keep_valid = select(
                scores,
                candidates,
                stored.positions,
                policy.budget_at(tokens_seen),
                protected=protected,
                mode=policy.selection,
                safeguard=policy.safeguard,
                spans=policy.fair_spans or None,
            )
        return self._keep(stored, inputs, keep_idx, keep_valid, scorer_state, tokens_seen)

    def apply_recorded(
        self,
        stored: StoredKV,
        kept: Tensor | None,
        seen_valid: Tensor,
        queries: Tensor,
        query_positions: Tensor,
        rope_offset: Tensor,
        tokens_seen: int,
        last_event_position: int,
        scaling: float,
        codes: LayerCodes | None = None,
    ) -> tuple[StoredKV, EventRecord | None]:
        """Run one event keeping the positions `kept` [b, h_kv, k] (`EventRecord.kept` of the cache that ran
        this event, -1 = empty slot), or, for `kept` None (the cache evicted nothing then), keeping everything.
        `codes`: per discrete side, the cache's encodings of the tokens this event archives (its recent ones).

        No scoring and no selection: merging (KeepKV) merges the entries not in `kept` into them, and the codecs
        archive the kept set, as after a selection. The kept slots keep the recorded layout, so attention sums
        over the same slots in the same order. `seen_valid` [b, tokens_seen] says which positions are real tokens
        in this forward: a kept position masked out here (a row that ended before this event) becomes an empty
        slot. The scorer's state is not carried: every later event of this layer applies a record too. Raises
        ValueError when a kept real position is not stored, or when `kept` is None although the layer holds more
        tokens than its budget (records of another sequence or schedule).
        """
        layer = self.policy.layer_idx
        if kept is None:
            if self._over_budget(stored, tokens_seen):
                raise ValueError(
                    f"layer {layer}: no recorded keep-set for the event at {tokens_seen} tokens seen, but the layer "
                    f"holds more than its budget of {self.policy.budget_at(tokens_seen)} tokens; the records belong "
                    "to another sequence or schedule"
                )
            return _flushed(stored, {}, codes), None
        keep_idx, keep_valid = _recorded_columns(stored, kept, seen_valid, tokens_seen, layer)
        inputs = self._inputs(stored, queries, query_positions, rope_offset, last_event_position, scaling)
        return self._keep(stored, inputs, keep_idx, keep_valid, {}, tokens_seen, codes)

    def _inputs(
        self, stored: StoredKV, queries: Tensor, query_positions: Tensor, rope_offset: Tensor,
        last_event_position: int, scaling: float,
    ) -> ScoreInputs:
        return ScoreInputs(
            keys=stored.keys,
            values=stored.values,
            positions=stored.positions,
            valid=stored.valid,
            has_history=stored.has_history,
            queries=queries,
            query_positions=query_positions,
            rope_offset=rope_offset,
            scaling=scaling,
            layer_idx=self.policy.layer_idx,
            last_event_position=last_event_position,
            log_votes=stored.log_votes,
            rope=self.rope,
        )

    def _over_budget(self, stored: StoredKV, tokens_seen: int) -> bool:
        return int(stored.valid.sum(dim=2).max()) > self.policy.budget_at(tokens_seen)

    def _keep(
        self, stored: StoredKV, inputs: ScoreInputs, keep_idx: Tensor, keep_valid: Tensor,
        scorer_state: dict[str, Tensor], tokens_seen: int, codes: LayerCodes | None = None,
    ) -> tuple[StoredKV, EventRecord]:
        """The stored set after keeping `keep_idx` (merging the rest into it when the policy merges); `codes` as
        in `apply_recorded`."""
        if self.merger is not None:
            keys, values, log_votes, merge_state = self.merger(
                inputs, _prefixed(stored.state, _MERGE_STATE), keep_idx, keep_valid
            )
            key_store, value_store = TokenStore(keys), TokenStore(values)
        else:
            codes = codes or {}
            key_store, value_store = (stored.store(side).gather(keep_idx, codes.get(side)) for side in SIDES)
            log_votes, merge_state = None, {}
        positions = torch.gather(stored.positions, 2, keep_idx).masked_fill(~keep_valid, -1)
        state = {
            **{_SCORER_STATE + k: torch.gather(v, 2, keep_idx) for k, v in scorer_state.items()},
            **_prefix(merge_state, _MERGE_STATE),
        }
        kept = StoredKV(
            key_store=key_store,
            value_store=value_store,
            positions=positions,
            valid=keep_valid,
            has_history=keep_valid.clone(),
            log_votes=log_votes,
            state=state,
        )
        return kept, EventRecord(tokens_seen=tokens_seen, kept=positions)


# Per layer, the key-side and the value-side low-rank pair (None where that side is not low rank).
LayerPairs = tuple[list[LowRankPair | None], list[LowRankPair | None]]


def build_compressors(
    config: KVCompressionConfig, model, *, projections: LayerPairs | None = None
) -> list[LayerCompressor | None]:
    """One compressor per layer of `model` (None for dense layers), with the codecs the config asks for.

    `projections` replaces the pairs read from `config.lowrank.projections` (see `layer_codecs`). The model's
    rotary embedding is taken once here, in float32, for the scorers that un-rotate queries (Expected Attention):
    with rope scaling (Llama-3.1's llama3, YaRN) the default frequencies would be wrong.
    """
    model_config = model.config
    policies, codecs = bind_config(config, model_config, projections=projections)
    rope = model_rope(model, dtype=torch.float32)
    compressors = [LayerCompressor(policy, codecs[i], rope) if policy is not None else None
                   for i, policy in enumerate(policies)]
    for compressor in compressors:
        if compressor is not None:
            compressor.scorer.bind(model)  # a scorer with weights of its own (gates) reads them from the model
    return compressors


def bind_config(
    config: KVCompressionConfig, model_config, *, projections: LayerPairs | None = None
) -> tuple[list[LayerPolicy | None], list[LayerCodecs]]:
    """Per layer, the policy (None: dense) and the codecs of `config` on a model of `model_config`, with every check
    that needs only the model's config.json (layers, heads, head dimension, the files the config names): an entry
    point runs it before loading weights, so that a config that does not fit fails in seconds."""
    check_config_for_model(config, model_config)
    num_layers = model_config.num_hidden_layers
    codecs = layer_codecs(config, model_config, projections=projections)
    check_codec_dims(codecs, model_config, config)
    return [config.layer_policy(i, num_layers) for i in range(num_layers)], codecs


def layer_codecs(
    config: KVCompressionConfig, model_config, *, projections: LayerPairs | None = None
) -> list[LayerCodecs]:
    """Per layer, the codecs of keys and values. The low-rank pairs come from `config.lowrank.projections`,
    or from `projections` when given: training passes the pairs it is learning, so that the codecs compute
    with those very tensors (and gradients reach them) instead of the file's frozen copy."""
    num_layers = model_config.num_hidden_layers
    key_pairs = value_pairs = [None] * num_layers
    if projections is not None:
        key_pairs, value_pairs = _supplied_pairs(projections, config, num_layers)
    elif config.lowrank is not None:
        key_pairs, value_pairs = projections_for(config.lowrank, model_config)
    key_bits = value_bits = [None] * num_layers
    group = 0
    if config.quant is not None:
        key_bits, value_bits = [config.quant.key_bits] * num_layers, [config.quant.value_bits] * num_layers
        group = config.quant.group_size
        if config.quant.plan:
            plan_bits = checked_quant_plan(config, num_layers).bits
            key_bits = [b if config.quant.key_bits is not None else None for b in plan_bits]
            value_bits = [b if config.quant.value_bits is not None else None for b in plan_bits]
    return [
        LayerCodecs(_codec(key_pairs[i], key_bits[i], group), _codec(value_pairs[i], value_bits[i], group))
        for i in range(num_layers)
    ]


def checked_quant_plan(config: KVCompressionConfig, num_layers: int) -> QuantPlan:
    """The calibrated TaDA plan of `config.quant.plan`, refused where it disagrees with the config or the model.

    Its bits were chosen by measuring each layer quantised at the plan's `group_size`, so the config must
    quantise with that group size; its `residual_length` (tokens kept in full precision) is, at run time, the
    tokens since the last event, i.e. `schedule.interval`.
    """
    path = config.quant.plan
    plan = read_quant_plan(path)
    if len(plan.bits) != num_layers:
        raise ConfigError(f"{path}: {len(plan.bits)} layers in the plan, the model has {num_layers}")
    if plan.group_size != config.quant.group_size:
        raise ConfigError(
            f"{path}: group_size={plan.group_size} but quant.group_size={config.quant.group_size}: the plan's bits "
            f"were chosen at its group size; set quant.group_size: {plan.group_size}"
        )
    if plan.residual_length != config.schedule.interval:
        raise ConfigError(
            f"{path}: residual_length={plan.residual_length} but schedule.interval={config.schedule.interval}: the "
            "cache keeps the tokens since the last event (at most schedule.interval) in full precision; set "
            f"schedule.interval: {plan.residual_length} or calibrate with --tada-residual-length "
            f"{config.schedule.interval}"
        )
    return plan


def projections_for(lowrank: LowRankConfig, model_config) -> LayerPairs:
    """Per-layer key and value pairs for a `LowRankConfig`: read, checked against the model, truncated."""
    path = Path(lowrank.projections)
    projections = read_projections_for_model(path, model_config)
    sides = []
    for use, rank, pairs, side in (
        (lowrank.keys, lowrank.key_rank, projections.keys, "key"),
        (lowrank.values, lowrank.value_rank, projections.values, "value"),
    ):
        if not use:
            sides.append([None] * len(pairs))
            continue
        if rank is not None and any(rank > p.rank for p in pairs):
            raise ValueError(f"{path}: {side} rank {rank} requested, the file holds ranks {[p.rank for p in pairs]}")
        sides.append([p.truncate(rank) if rank is not None else p for p in pairs])
    return sides[0], sides[1]


def _supplied_pairs(projections: LayerPairs, config: KVCompressionConfig, num_layers: int) -> LayerPairs:
    if config.lowrank is None:
        raise ValueError("low-rank projections were supplied, but the compression config has no `lowrank` section")
    key_pairs, value_pairs = projections
    for side, pairs in (("key", key_pairs), ("value", value_pairs)):
        if len(pairs) != num_layers:
            raise ValueError(f"{len(pairs)} {side} projection pairs supplied, the model has {num_layers} layers")
    return key_pairs, value_pairs


def _codec(pair: LowRankPair | None, bits: int | None, group_size: int) -> Codec | None:
    lowrank = LowRankCodec(pair) if pair is not None else None
    tada = TadaCodec(bits, group_size) if bits is not None else None
    if lowrank is not None and tada is not None:
        return ChainCodec(lowrank, tada)
    return lowrank or tada


def _flushed(stored: StoredKV, scorer_state: dict[str, Tensor], codes: LayerCodes | None = None) -> StoredKV:
    """The stored set after an event that evicts nothing: recent tokens archived through the codecs (`codes` as in
    `LayerCompressor.apply_recorded`)."""
    state = {**_prefix(scorer_state, _SCORER_STATE), **_pick(stored.state, _MERGE_STATE)}
    codes = codes or {}
    flushed = {"key_store": stored.key_store.flush(codes.get("keys")),
               "value_store": stored.value_store.flush(codes.get("values"))}
    return StoredKV(**{**stored.__dict__, **flushed, "state": state})


def _recorded_columns(
    stored: StoredKV, kept: Tensor, seen_valid: Tensor, tokens_seen: int, layer: int
) -> tuple[Tensor, Tensor]:
    """(keep_idx, keep_valid) [b, h_kv, k] of the recorded positions `kept` among the stored columns; a kept
    position masked out in `seen_valid` [b, tokens_seen] is an empty slot, stored or not.

    A position table per (row, head) maps each stored position to its column (empty slots, position -1, map to
    a spare entry), so the lookup costs O(tokens seen) rather than comparing every kept slot with every column.
    """
    b, h, n = stored.positions.shape
    if kept.dim() != 3 or kept.shape[:2] != (b, h):
        raise ValueError(f"layer {layer}: a recorded keep-set of shape {tuple(kept.shape)} for [b={b}, h_kv={h}, k] "
                         "stored rows and heads")
    kept = kept.to(device=stored.positions.device, dtype=torch.long)
    wanted = kept >= 0
    if bool((kept >= tokens_seen).any()):
        raise ValueError(f"layer {layer}: the recorded keep-set of the event at {tokens_seen} tokens seen names "
                         f"position {int(kept.max())}, which had not been seen")
    spare = tokens_seen
    table = torch.full((b, h, tokens_seen + 1), -1, dtype=torch.long, device=kept.device)
    slots = stored.positions.masked_fill(stored.positions < 0, spare)
    table.scatter_(2, slots, torch.arange(n, device=kept.device).expand(b, h, n))
    wanted &= seen_valid.to(kept.device)[:, None, :].expand(b, h, tokens_seen).gather(2, kept.clamp(min=0))
    columns = table.gather(2, kept.masked_fill(~wanted, spare))
    missing = wanted & (columns < 0)
    if bool(missing.any()):
        position = int(kept[missing][0])
        raise ValueError(f"layer {layer}: the recorded keep-set of the event at {tokens_seen} tokens seen keeps "
                         f"position {position}, which this layer no longer stores; the records belong to another "
                         "sequence or schedule")
    keep_idx = columns.masked_fill(~wanted, 0)
    return keep_idx, wanted & stored.valid.gather(2, keep_idx)


def _prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _pick(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _detached(inputs: ScoreInputs) -> ScoreInputs:
    fields = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in inputs.__dict__.items()}
    return ScoreInputs(**fields)
