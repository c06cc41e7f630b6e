"""Rollouts sampled through a `CompressedCache`, and the per-row record the training step replays.

During GRPO's generation step `recording_generate` makes the policy's `generate` sample through a
`CompressedCache(record=True)` (or a plain cache for full-cache rollouts) and note, per generated token, the
log-probability the sampler gave it. The cache's records (per layer, the kept positions of each compression
event, [rows, KV heads, k]) and, where a codec quantises, its codes become `KeepSetBatch` tensors whose first
dimension is the row, so they travel with the batch through TRL's shuffling and splitting (`shuffle_sequence_dict`,
`split_tensor_dict`) and come back, for any subset of rows, as the `records` and `codes` that
`replay_compression(..., keep_sets=..., codes=...)` applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList

from kvtrain.config import KVCompressionConfig
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.compressor import EventRecord, LayerCodes

# Batch keys (the dict TRL passes from generation to the loss).
KEPT = "kv_kept"  # [N, L, E, H, K] int32: kept positions of event e of layer l (-1: empty slot or padding)
EVENT_SEEN = "kv_event_seen"  # [N, L, E] int32: tokens seen at that event (-1: no event in this slot)
EVENT_WIDTH = "kv_event_width"  # [N, L, E] int32: slots the cache held after that event (the record's k)
POLICY_STEP = "kv_policy_step"  # [N] long: optimizer steps taken when the row was sampled
CODES = "kv_codes"  # CODES.<layer>.<side>.<name> [N, h, T, w]: a quantised side's encodings of positions 0..T-1


class SampledLogProbs(LogitsProcessor):
    """Notes log softmax(logits / temperature) of each token the sampler then picks, without changing the logits.

    It runs after transformers' own logits processors (e.g. a repetition penalty) and before the sampling
    warpers (temperature, top-k, top-p), so it measures what the training forward computes for the same token:
    the temperature-scaled distribution, not the truncated one. Only one step's distribution is held at a time.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[Tensor] = []
        self._pending: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._pending is not None:  # the token chosen from the previous step's distribution is now the last one
            self.steps.append(self._pending.gather(1, input_ids[:, -1:]))
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: Tensor, generated: int) -> Tensor:
        """[N, generated]: the log-probability of each generated token of `sequences`."""
        if self._pending is not None:
            self.steps.append(self._pending.gather(1, sequences[:, -1:]))
            self._pending = None
        if len(self.steps) < generated:
            raise RuntimeError(f"generate produced {generated} tokens but its logits were seen for {len(self.steps)}")
        return torch.cat(self.steps[:generated], dim=1) if generated else sequences.new_zeros(sequences.shape[0], 0).float()


@dataclass
class Rollout:
    """One `generate` call: the sampler's log-probabilities [N, C] of the C generated tokens of each row, and the
    cache's records and codes (None for full-cache rollouts)."""

    logprobs: Tensor
    records: list[list[EventRecord]] | None
    codes: list[LayerCodes | None] | None = None


@contextlib.contextmanager
def recording_generate(model, causal_lm, kv_config: KVCompressionConfig | None, temperature: float) -> Iterator[list[Rollout]]:
    """Within this block, `model.generate` samples through a fresh `CompressedCache(record=True)` of `kv_config`
    (a plain cache when None) and appends a `Rollout` per call to the yielded list.

    `model` is the object generation is called on (a PeftModel or the causal LM), `causal_lm` the causal LM whose
    attention modules the cache hooks. The instance's `generate` is wrapped for the block only: TRL calls it deep
    inside its generation step, with its own padding, unwrapping of DDP/DeepSpeed and parameter gathering, which
    this reuses instead of repeating.
    """
    rollouts: list[Rollout] = []
    original = model.generate
    shadowed = "generate" in vars(model)

    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is not None or kwargs.get("logits_processor"):
            raise ValueError("recording_generate supplies the cache and a logits processor; pass neither")
        prompt_len = (kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[1]
        recorder = SampledLogProbs(temperature)
        cache = CompressedCache.for_model(causal_lm, kv_config, record=True) if kv_config is not None else None
        sequences = original(*args, past_key_values=cache, logits_processor=LogitsProcessorList([recorder]), **kwargs)
        if not isinstance(sequences, Tensor):
            raise ValueError("recording_generate needs generate to return the token ids (return_dict_in_generate=False)")
        logprobs = recorder.finish(sequences, sequences.shape[1] - prompt_len)
        rollouts.append(Rollout(logprobs, *((cache.records, cache.codes) if cache is not None else (None, None))))
        return sequences

    model.generate = generate
    try:
        yield rollouts
    finally:
        if shadowed:
            model.generate = original
        else:
            del model.generate


@dataclass
class KeepSetBatch:
    """The recorded keep-sets (and codes) of N rows as tensors with the row first (see the batch keys above)."""

    kept: Tensor
    seen: Tensor
    width: Tensor
    codes: dict[str, Tensor] = field(default_factory=dict)  # CODES.<layer>.<side>.<name>

    @classmethod
    def from_records(cls, records: list[list[EventRecord]], rows: int,
                     codes: list[LayerCodes | None] | None = None) -> "KeepSetBatch":
        layers = len(records)
        events = max((len(layer) for layer in records), default=0)
        shapes = [r.kept.shape for layer in records for r in layer]
        heads = max((s[1] for s in shapes), default=0)
        width = max((s[2] for s in shapes), default=0)
        kept = torch.full((rows, layers, events, heads, width), -1, dtype=torch.int32)
        seen = torch.full((rows, layers, events), -1, dtype=torch.int32)
        widths = torch.zeros((rows, layers, events), dtype=torch.int32)
        for l, layer in enumerate(records):
            for e, record in enumerate(layer):
                if record.kept.shape[0] != rows:
                    raise ValueError(f"layer {l}: a record of {record.kept.shape[0]} rows for a batch of {rows}")
                h, k = record.kept.shape[1:]
                kept[:, l, e, :h, :k] = record.kept.to(torch.int32).cpu()
                seen[:, l, e] = record.tokens_seen
                widths[:, l, e] = k
        flat = {f"{CODES}.{l}.{side}.{name}": t.cpu()
                for l, layer in enumerate(codes or []) if layer is not None
                for side, encoded in layer.items() for name, t in encoded.items()}
        return cls(kept, seen, widths, flat)

    def fields(self, device=None) -> dict[str, Tensor]:
        fields = {KEPT: self.kept, EVENT_SEEN: self.seen, EVENT_WIDTH: self.width, **self.codes}
        return {key: t.to(device) for key, t in fields.items()}

    @classmethod
    def from_fields(cls, inputs: dict) -> "KeepSetBatch":
        missing = [key for key in (KEPT, EVENT_SEEN, EVENT_WIDTH) if key not in inputs]
        if missing:
            raise ValueError(f"the batch carries no recorded keep-sets ({', '.join(missing)} missing): it was not "
                             "sampled through a compressed cache")
        codes = {key: t for key, t in inputs.items() if key.startswith(CODES + ".")}
        return cls(inputs[KEPT], inputs[EVENT_SEEN], inputs[EVENT_WIDTH], codes)

    @property
    def rows(self) -> int:
        return self.kept.shape[0]

    def slice(self, start: int, end: int) -> "KeepSetBatch":
        return KeepSetBatch(self.kept[start:end], self.seen[start:end], self.width[start:end],
                            {key: t[start:end] for key, t in self.codes.items()})

    def layer_codes(self, device=None) -> list[LayerCodes | None]:
        """Per layer, the codes of these rows (`CompressedCache.codes`), None where none were recorded."""
        layers: list[LayerCodes | None] = [None] * self.kept.shape[1]
        for key, t in self.codes.items():
            l, side, name = key[len(CODES) + 1 :].split(".")
            layer = layers[int(l)] = layers[int(l)] or {}
            layer.setdefault(side, {})[name] = t.to(device)
        return layers

    def records(self, device=None) -> list[list[EventRecord]]:
        """Per layer, the `EventRecord`s of these rows, as the sampling cache recorded them.

        Every row must come from the same `generate` call (same events per layer): TRL splits one generation
        batch into micro-batches, never mixes two."""
        if not bool((self.seen == self.seen[:1]).all()) or not bool((self.width == self.width[:1]).all()):
            raise ValueError("rows sampled by different generate calls (different compression events) in one batch")
        out = []
        for l in range(self.kept.shape[1]):
            layer = []
            for e in range(self.kept.shape[2]):
                tokens_seen = int(self.seen[0, l, e])
                if tokens_seen < 0:
                    continue
                k = int(self.width[0, l, e])
                layer.append(EventRecord(tokens_seen, self.kept[:, l, e, :, :k].to(device=device, dtype=torch.long)))
            out.append(layer)
        return out
