"""Training the retention gates: the threshold policy as an additive log-mask in one teacher-forced forward.

Inside `gate_relaxation(model, config, prefill_len=P)`, every compressed layer attends with the mask the cache
would build under the gate scorer's threshold mode (`kvtrain.policies.gates`): a key is hidden from query row i
once the last event before i's forward (`archived_before`) found it at least `window` tokens old, outside the
sinks and the recent tokens, and its gate said evict. Deciding at the *last* such event is the same as deciding at
the first eligible one, because age and "outside the recent tokens" only grow with later events.

The decision is a Gumbel-sigmoid with a straight-through hard forward: ``keep = 1[logit + noise > 0]`` decides the
mask (0 or -inf, so the forward without noise equals the cache's decode), and the gradient is that of
``log sigmoid((logit + noise) / temperature)``, the DMS log(1 - alpha) relaxation. A hidden key receives no
gradient through attention (its probability is exactly 0), so exploration comes from the noise. The budget cap of
the threshold mode is not modelled: train with a budget at least the sequence length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvtrain.config import KVCompressionConfig, LayerPolicy
from kvtrain.models.rope import model_rope, unrotate
from kvtrain.policies.gates import GateScorer, RetentionGates, attached_gates
from kvtrain.runtime.attention import grouped_sdpa, key_validity
from kvtrain.runtime.routing import Route, routed, use_kvtrain_attention
from kvtrain.runtime.schedule import archived_before, event_points, forward_starts


def gate_log_mask(
    keep_logits: Tensor,
    valid: Tensor,
    policy: LayerPolicy,
    prefill_len: int,
    *,
    window: int,
    temperature: float = 1.0,
    noise: Tensor | None = None,
) -> Tensor:
    """Additive attention bias ``[b, h_kv, S, S]`` of the threshold gate policy (0 visible, -inf hidden) with a
    straight-through gradient into `keep_logits` ``[b, h_kv, S]``; `valid` ``[b, S]`` marks real tokens (no left
    padding: the sinks are the first `policy.sinks` columns); `noise` (logistic, ``[b, h_kv, S]``) is added
    to the logits in training."""
    b, h, seq = keep_logits.shape
    device = keep_logits.device
    z = keep_logits if noise is None else keep_logits + noise
    soft = F.logsigmoid(z / temperature)
    keep = z >= 0  # as in the cache, which evicts only below 0
    points = event_points(policy.schedule, prefill_len, seq)
    last = archived_before(forward_starts(seq, prefill_len, policy.schedule.prefill_chunk, device), points)  # [S]
    j = torch.arange(seq, device=device)
    e = last[:, None]  # per query row: tokens seen at the last event before its forward
    eligible = (j[None, :] < e) & (e - 1 - j[None, :] >= window) & (j[None, :] < e - policy.recent)
    eligible &= j[None, :] >= policy.sinks  # [S, S]
    causal = j[None, :] <= j[:, None]
    hidden = eligible[None, None] & ~keep[:, :, None, :]  # [b, h, S, S]
    visible = causal[None, None] & valid[:, None, None, :].bool() & ~hidden
    bias = torch.zeros(b, h, seq, seq, device=device).masked_fill(~visible, float("-inf"))
    # Straight-through: the forward value is the hard bias, the gradient that of the soft log-keep.
    relaxed = torch.where(eligible[None, None], soft[:, :, None, :], torch.zeros_like(soft[:, :, None, :]))
    return bias + (relaxed - relaxed.detach())


@dataclass
class GateRelaxation(Route):
    """The route of `gate_relaxation`: masked attention per layer, and each layer's soft evict fraction."""

    policies: list[LayerPolicy | None]
    gates: RetentionGates
    rope: object
    prefill_len: int
    window: int
    temperature: float
    noisy: bool

    def __post_init__(self) -> None:
        self.evicted: dict[int, Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling, position_ids) -> Tensor:
        layer = module.layer_idx
        b, _, seq, _ = query.shape
        valid = key_validity(attention_mask, seq, batch=b, device=query.device)
        policy = self.policies[layer]
        if policy is None:
            j = torch.arange(seq, device=query.device)
            visible = (j[None, :] <= j[:, None])[None, None] & valid[:, None, None, :]
            bias = torch.zeros(visible.shape, device=query.device).masked_fill(~visible, float("-inf"))
            return grouped_sdpa(query, key, value, bias, scaling)
        logits = self.keep_logits(layer, key, value, position_ids)
        noise = None
        if self.noisy:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)  # logistic: the difference of two Gumbels
        bias = gate_log_mask(logits, valid, policy, self.prefill_len, window=self.window,
                             temperature=self.temperature, noise=noise)
        real = valid[:, None, :].float()
        evict = torch.sigmoid(-(logits if noise is None else logits + noise) / self.temperature)
        self.evicted[layer] = (evict * real).sum() / (real.sum() * logits.shape[1]).clamp(min=1.0)
        return grouped_sdpa(query, key, value, bias, scaling)

    def keep_logits(self, layer: int, key: Tensor, value: Tensor, position_ids: Tensor | None) -> Tensor:
        b, h, seq, d = key.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=key.device)[None].expand(b, seq)
        cos, sin = self.rope(position_ids)
        pre = unrotate(key.float(), cos.float(), sin.float())
        return self.gates.logits(layer, pre, value.float())

    def evict_fraction(self) -> Tensor:
        """Mean soft evict probability over the compressed layers of the latest forward (what the compression
        term drives towards the target)."""
        if not self.evicted:
            raise ValueError("no compressed layer ran under the gate relaxation yet")
        return torch.stack(list(self.evicted.values())).mean()


def compression_loss(evict_fraction: Tensor, target: float) -> Tensor:
    """DMS's one-sided term: penalise evicting less than the target share, never more."""
    return F.relu(target - evict_fraction)


def ramped_target(step: int, ramp_steps: int, ratio: float) -> float:
    """Evict-share target at `step`: linear from 0 (1x) to ``1 - 1/ratio`` over `ramp_steps`."""
    return (1.0 - 1.0 / ratio) * min(1.0, step / max(ramp_steps, 1))


@contextlib.contextmanager
def gate_relaxation(
    model, config: KVCompressionConfig, *, prefill_len: int, noisy: bool = False, temperature: float = 1.0
) -> Iterator[GateRelaxation]:
    """Within this block, forwards of `model` attend under the threshold gate policy of `config` (scorer
    ``gate`` with ``mode: threshold``): the hard mask, exactly the cache's decode when `noisy` is False."""
    if config.scorer.name != GateScorer.name or config.scorer.params.get("mode") != "threshold":
        raise ValueError("gate_relaxation trains the threshold gate policy: the config's scorer must be 'gate' with "
                         "mode: threshold")
    if config.merge is not None or config.quant is not None or config.lowrank is not None:
        raise ValueError("gate_relaxation models eviction only: train without merge, quant and lowrank")
    scorer = GateScorer(**config.scorer.params)
    use_kvtrain_attention(model)
    num_layers = model.config.num_hidden_layers
    route = GateRelaxation(
        policies=[config.layer_policy(i, num_layers) for i in range(num_layers)],
        gates=attached_gates(model, scorer.weights),
        rope=model_rope(model, dtype=torch.float32),
        prefill_len=prefill_len,
        window=scorer.window,
        temperature=temperature,
        noisy=noisy,
    )
    with routed(model, route):
        yield route
