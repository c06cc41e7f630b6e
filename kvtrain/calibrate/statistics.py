"""One streaming pass of calibration statistics, collected from the attention inputs of plain forwards.

Per layer (all float64 sums, so a checkpoint/resume reproduces an uninterrupted run bit for bit):
* ``grams``: KQ-SVD key Gram and group query Gram of the **post-RoPE** keys/queries (group queries stacked);
* ``values``: value Gram (for the value side of KQ-SVD);
* ``query_sum`` ``[h_q, d]`` / ``query_outer`` ``[h_q, d, d]`` / ``query_count``: first and second moments of
  the **pre-RoPE** queries per query head (RoPE undone with the model's own rotary embedding, rope scaling
  included, at each token's position), skipping the first
  ``n_sink`` positions of each block as Expected Attention does (docs/methods.md#expected-attention);
* head behaviour (see `kvtrain.calibrate.head_budgets` for what the numbers mean): per query head the summed
  copy mass over copy events and the summed normalised attention entropy of every ``entropy_stride``-th query
  (only those rows of the attention matrix and the copy-event rows are computed);
* ``sals_grams``: the joint Gram of the **pre-RoPE** keys (KV heads concatenated) for SALS, RoPE undone with the
  model's own rotary embedding (rope scaling included) at the block's positions.

Blocks are fed one at a time from position 0 (batch 1, no padding), so every accumulator sums the same
terms in the same order however the run is split.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvtrain.lowrank import GramAccumulator, JointKeyGramAccumulator, ValueGramAccumulator
from kvtrain.models.rope import RopeFn, model_rope, unrotate
from kvtrain.models.shape import ModelShape
from kvtrain.runtime.routing import observe_attention

GROUPS = ("grams", "query_stats", "head_behaviour", "sals_grams")


def copy_sources(ids: Tensor) -> Tensor:
    """``src[t, j]`` ``[S, S]`` bool: position j is a copy source for the query at position t.

    The query at t predicts ``ids[t+1]``; j is a source when the bigram ``(ids[t], ids[t+1])`` already
    occurred at ``(j-1, j)`` with ``1 <= j <= t``, i.e. the next token can be copied from j (the
    induction / retrieval pattern). Rows with no source are not copy events; the last position has none.
    """
    s = ids.shape[0]
    same_prev = ids[None, :-1] == ids[:-1, None]  # [t, j-1]: ids[j-1] == ids[t], t < S-1
    same_next = ids[None, 1:] == ids[1:, None]  # [t, j-1]: ids[j] == ids[t+1]
    src = torch.zeros(s, s, dtype=torch.bool)
    src[:-1, 1:] = same_prev & same_next
    return src & torch.ones(s, s, dtype=torch.bool).tril()


class StatisticsCollector:
    """Accumulates the selected `GROUPS` for every layer; `observe` is an `observe_attention` observer."""

    def __init__(self, shape: ModelShape, groups: tuple[str, ...], n_sink: int = 4, entropy_stride: int = 4,
                 rope: RopeFn | None = None) -> None:
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown statistics groups {unknown}; choose from {GROUPS}")
        needs_rope = sorted({"sals_grams", "query_stats"} & set(groups))
        if needs_rope and rope is None:
            raise ValueError(f"the {needs_rope} statistics un-rotate with the model's rotary embedding: pass "
                             "rope=model_rope(model, dtype=torch.float32)")
        self.rope = rope
        if n_sink < 0:
            raise ValueError(f"n_sink={n_sink} must be >= 0")
        if entropy_stride < 1:
            raise ValueError(f"entropy_stride={entropy_stride} must be >= 1")
        self.shape, self.groups, self.n_sink, self.entropy_stride = shape, tuple(groups), n_sink, entropy_stride
        L, hq, hkv, d = shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.grams = [GramAccumulator(hkv, d, shape.group_size, layer) for layer in range(L)]
        self.values = [ValueGramAccumulator(hkv, d, layer) for layer in range(L)]
        self.query_sum = torch.zeros(L, hq, d, dtype=torch.float64)
        self.query_outer = torch.zeros(L, hq, d, d, dtype=torch.float64)
        self.query_count = torch.zeros(L, dtype=torch.int64)
        self.copy_mass = torch.zeros(L, hq, dtype=torch.float64)
        self.copy_events = torch.zeros(L, dtype=torch.int64)
        self.entropy_sum = torch.zeros(L, hq, dtype=torch.float64)
        self.entropy_count = torch.zeros(L, dtype=torch.int64)
        # O(L (h_kv d)^2): allocated only when asked for, and only then part of the checkpoints.
        self.sals_grams = (
            [JointKeyGramAccumulator(hkv, d, layer) for layer in range(L)] if "sals_grams" in groups else []
        )
        self._ids: Tensor | None = None
        empty = torch.zeros(0, dtype=torch.long)
        self._rows, self._source_pairs, self._entropy_rows, self._num_events = empty, (empty, empty), empty, 0

    def start_block(self, ids: Tensor) -> None:
        """The token ids ``[S]`` of the block about to be forwarded (needed for copy events)."""
        self._ids = ids
        if "head_behaviour" in self.groups:
            s = ids.shape[0]
            src = copy_sources(ids.cpu())
            events = src.any(dim=-1)
            strided = torch.zeros(s, dtype=torch.bool)
            strided[self.entropy_stride :: self.entropy_stride] = True  # t >= 1: t = 0 sees one key
            rows = (events | strided).nonzero(as_tuple=True)[0]
            row_index = torch.full((s,), -1, dtype=torch.long)
            row_index[rows] = torch.arange(rows.numel())
            t_idx, j_idx = src.nonzero(as_tuple=True)
            self._rows = rows.to(ids.device)
            self._source_pairs = (row_index[t_idx].to(ids.device), j_idx.to(ids.device))
            self._entropy_rows = strided[rows].nonzero(as_tuple=True)[0].to(ids.device)
            self._num_events = int(events.sum())

    def observe(self, module, query: Tensor, key: Tensor, value: Tensor, attention_mask) -> None:
        layer = module.layer_idx
        if self._ids is None:
            raise RuntimeError("start_block was not called before the forward")
        if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
            raise ValueError(f"layer {layer}: calibration expects one block without cache, got query "
                             f"{tuple(query.shape)} and keys {tuple(key.shape)}")
        for name, x in (("queries", query), ("keys", key), ("values", value)):
            if not torch.isfinite(x).all():
                raise ValueError(f"layer {layer}: attention {name} contain NaN or inf")
        if "grams" in self.groups:
            self.grams[layer].update(key, query)
            self.values[layer].update(value)
        if "query_stats" in self.groups:
            self._update_query_stats(layer, query)
        if "head_behaviour" in self.groups:
            self._update_head_behaviour(layer, query, key, module.scaling)
        if "sals_grams" in self.groups:
            cos, sin = self.rope(torch.arange(key.shape[2], device=key.device)[None])
            self.sals_grams[layer].update(unrotate(key, cos, sin))
        return None

    def _update_query_stats(self, layer: int, query: Tensor) -> None:
        s = query.shape[2]
        cos, sin = self.rope(torch.arange(s, device=query.device)[None])
        pre = unrotate(query.float(), cos.float(), sin.float())[0, :, self.n_sink :].to(torch.float64)
        self.query_sum[layer] += pre.sum(dim=1).cpu()
        self.query_outer[layer] += torch.einsum("hnd,hne->hde", pre, pre).cpu()
        self.query_count[layer] += pre.shape[1]

    def _update_head_behaviour(self, layer: int, query: Tensor, key: Tensor, scaling: float) -> None:
        # Only the rows needed are computed: copy-event queries and every entropy_stride-th query.
        rows = self._rows
        q = query[0, :, rows].float() * scaling  # [h_q, R, d]
        k = key[0].float().repeat_interleave(self.shape.group_size, dim=0)
        s = key.shape[2]
        visible = torch.arange(s, device=q.device)[None, :] <= rows[:, None]  # [R, S]
        raw = q @ k.mT
        masked = raw.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(masked, dim=-1)  # [h_q, R, S], exactly 0 on future keys
        row_of_pair, j_idx = self._source_pairs
        if j_idx.numel():
            # Summed over events, the mass on each event's sources is the sum over all (t, j) source pairs.
            self.copy_mass[layer] += probs[:, row_of_pair, j_idx].to(torch.float64).sum(dim=-1).cpu()
            self.copy_events[layer] += self._num_events
        sampled = self._entropy_rows
        if sampled.numel():
            # H = -sum p log p = lse - sum p * raw over p > 0; the row maximum gives lse without another exp
            # pass and without underflow: p_max = exp(raw_max - lse) >= 1 / (t + 1).
            p, r, m = probs[:, sampled], raw[:, sampled], masked[:, sampled]
            entropy = m.amax(dim=-1) - p.amax(dim=-1).log() - (p * r).sum(dim=-1)  # [h_q, n]
            uniform = torch.log(rows[sampled].float() + 1)
            self.entropy_sum[layer] += (entropy / uniform).to(torch.float64).sum(dim=-1).cpu()
            self.entropy_count[layer] += sampled.numel()

    # ------------------------------------------------------------------ results
    def query_moments(self) -> tuple[Tensor, Tensor]:
        """Pre-RoPE mean ``[L, h_q, d]`` and biased covariance ``[L, h_q, d, d]`` (float64)."""
        if (self.query_count == 0).any():
            raise ValueError(f"no query rows after skipping n_sink={self.n_sink} tokens; use longer blocks")
        n = self.query_count.to(torch.float64)
        mu = self.query_sum / n[:, None, None]
        sigma = self.query_outer / n[:, None, None, None] - mu[..., :, None] * mu[..., None, :]
        return mu, sigma

    def head_behaviour(self) -> tuple[Tensor, Tensor, Tensor]:
        """(mean copy mass ``[L, h_q]``, mean normalised entropy ``[L, h_q]``, copy events ``[L]``)."""
        events = self.copy_events.to(torch.float64)
        copy = torch.where(events[:, None] > 0, self.copy_mass / events.clamp(min=1)[:, None], 0.0)
        spread = self.entropy_sum / self.entropy_count.to(torch.float64).clamp(min=1)[:, None]
        return copy, spread, self.copy_events.clone()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors (safetensors-ready): every accumulator, counts as int64 scalars."""
        out: dict[str, Tensor] = {}
        for layer, (g, v) in enumerate(zip(self.grams, self.values)):
            out[f"grams.{layer}.key_gram"] = g.key_gram
            out[f"grams.{layer}.query_gram"] = g.query_gram
            out[f"grams.{layer}.num_key_tokens"] = torch.tensor(g.num_key_tokens)
            out[f"grams.{layer}.num_query_rows"] = torch.tensor(g.num_query_rows)
            out[f"values.{layer}.value_gram"] = v.value_gram
            out[f"values.{layer}.num_tokens"] = torch.tensor(v.num_tokens)
        for name in ("query_sum", "query_outer", "query_count", "copy_mass", "copy_events", "entropy_sum",
                     "entropy_count"):
            out[name] = getattr(self, name)
        for layer, g in enumerate(self.sals_grams):
            out[f"sals.{layer}.gram"] = g.gram
            out[f"sals.{layer}.num_tokens"] = torch.tensor(g.num_tokens)
        return {k: t.contiguous().clone() for k, t in out.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise ValueError(f"calibration state is missing {missing[:3]}")
        for key, ref in expected.items():
            if state[key].shape != ref.shape or state[key].dtype != ref.dtype:
                raise ValueError(f"calibration state {key} is {state[key].dtype} {tuple(state[key].shape)}, "
                                 f"expected {ref.dtype} {tuple(ref.shape)}")
        for layer, (g, v) in enumerate(zip(self.grams, self.values)):
            g.load_state_dict({**g._config(), "key_gram": state[f"grams.{layer}.key_gram"],
                               "query_gram": state[f"grams.{layer}.query_gram"],
                               "num_key_tokens": int(state[f"grams.{layer}.num_key_tokens"]),
                               "num_query_rows": int(state[f"grams.{layer}.num_query_rows"])})
            v.load_state_dict({**v._config(), "value_gram": state[f"values.{layer}.value_gram"],
                               "num_tokens": int(state[f"values.{layer}.num_tokens"])})
        for name in ("query_sum", "query_outer", "query_count", "copy_mass", "copy_events", "entropy_sum",
                     "entropy_count"):
            setattr(self, name, state[name].clone())
        for layer, g in enumerate(self.sals_grams):
            g.load_state_dict({**g._config(), "gram": state[f"sals.{layer}.gram"],
                               "num_tokens": int(state[f"sals.{layer}.num_tokens"])})



@torch.no_grad()
def collect_statistics(
    model,
    blocks: Tensor,
    groups: tuple[str, ...] = ("grams",),
    n_sink: int = 4,
    entropy_stride: int = 4,
    progress: bool = False,
) -> StatisticsCollector:
    """One in-memory pass over ``blocks`` ``[n, S]`` (no checkpoints): e.g. Grams for an ad-hoc fit."""
    rope = model_rope(model, dtype=torch.float32)
    collector = StatisticsCollector(ModelShape.of(model), groups, n_sink, entropy_stride, rope)
    with observe_attention(model, collector.observe):
        for block in tqdm(blocks, desc="calibration statistics", unit="block", disable=not progress):
            collector.start_block(block)
            model.model(input_ids=block[None])
    return collector
