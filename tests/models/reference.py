"""An independent model-level reference of KV-cache eviction, written without kvtrain's runtime.

The model runs plain transformers **eager** attention. A forward pre-hook on every attention module replaces its
mask by a dense per-(query head) visibility ``keep[layer][h_kv, i, j]`` (query i sees key j), forward hooks read
the explicit attention probabilities the eager path returns and the projections' outputs (pre-RoPE queries and
keys after any q/k norm, values), and RoPE comes from the model's own rotary embedding and transformers'
``apply_rotary_pos_emb``. The policies' scores are computed here from those explicit tensors, following
docs/methods.md, one (layer, KV head) at a time; selection keeps the sinks and recent tokens, then the best
scores (older first on ties) up to the budget.

Schedule: an event after the prefill (P tokens seen) and every `interval` decode steps. Because the visibility
of rows before an event never changes afterwards, one eager forward with the masks decided so far shows every
query before the event exactly the keys it had when it was decoded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


@dataclass
class Policy:
    """The settings the reference reproduces (a subset of `KVCompressionConfig`, per-head selection)."""

    scorer: str
    budget: int
    sinks: int
    recent: int
    query_window: int
    interval: int
    params: dict = field(default_factory=dict)


@dataclass
class Captured:
    """One eager forward: per layer the attention probabilities ``[h_q, S, S]``, pre-RoPE queries ``[h_q, S, d]``,
    pre-RoPE keys, post-RoPE keys and values ``[h_kv, S, d]``; logits ``[S, V]``."""

    probs: list[Tensor]
    pre_queries: list[Tensor]
    pre_keys: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    logits: Tensor


def attention_modules(model) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """``[1, S, h*d]`` or ``[1, S, h, d]`` -> ``[h, S, d]``."""
    return x.reshape(x.shape[1], -1, head_dim).transpose(0, 1)


def rope_tables(model, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The model's own cos/sin ``[1, n, d]`` (float32) at `positions` ``[n]``."""
    return model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions[None])


def eager_forward(model, ids: Tensor, keep: list[Tensor] | None) -> Captured:
    """A plain eager forward of ``ids`` ``[1, S]``; ``keep[l]`` ``[h_kv, S, S]`` bool (None: causal)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    seq = ids.shape[1]
    probs, pre_q, pre_k, values = {}, {}, {}, {}
    handles = []
    for layer, attn in enumerate(attention_modules(model)):
        if keep is not None:
            bias = torch.zeros(keep[layer].shape, dtype=torch.float32).masked_fill(~keep[layer], float("-inf"))
            bias = bias.repeat_interleave(group, dim=0)[None]  # [1, h_q, S, S]

            def set_mask(module, args, kwargs, bias=bias):
                return args, {**kwargs, "attention_mask": bias}

            handles.append(attn.register_forward_pre_hook(set_mask, with_kwargs=True))

        def grab(store, layer=layer):
            def hook(module, args, output):
                store[layer] = _heads(output.detach(), head_dim)
            return hook

        # Qwen3 normalises queries and keys per head before RoPE: the pre-RoPE tensors are the norms' outputs.
        handles.append(getattr(attn, "q_norm", attn.q_proj).register_forward_hook(grab(pre_q)))
        handles.append(getattr(attn, "k_norm", attn.k_proj).register_forward_hook(grab(pre_k)))
        handles.append(attn.v_proj.register_forward_hook(grab(values)))
        handles.append(attn.register_forward_hook(lambda m, a, out, layer=layer: probs.__setitem__(layer, out[1][0])))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0]
    finally:
        model.set_attn_implementation(previous)
        for handle in handles:
            handle.remove()
    cos, sin = rope_tables(model, torch.arange(seq))
    layers = range(len(probs))
    keys = [apply_rotary_pos_emb(pre_k[l][None], pre_k[l][None], cos, sin)[0][0] for l in layers]
    assert all(probs[l].shape[-1] == seq for l in layers), "eager attention did not return its probabilities"
    return Captured([probs[l] for l in layers], [pre_q[l] for l in layers], [pre_k[l] for l in layers], keys,
                    [values[l] for l in layers], logits)


# ---------------------------------------------------------------------------------------------------------- scores


def snapkv_scores(c: Captured, layer: int, h: int, group: int, cand: list[int], t: int, policy: Policy) -> list[float]:
    window = min(policy.params.get("window", 16), policy.query_window)
    kernel = policy.params.get("kernel_size", 5)
    rows = range(t - window, t)
    heads = range(h * group, (h + 1) * group)
    mean = [sum(float(c.probs[layer][q, i, j]) for q in heads for i in rows) / (group * len(rows)) for j in cand]
    half = kernel // 2
    return [max(mean[max(0, k - half) : k + half + 1]) for k in range(len(cand))]


def tova_scores(c: Captured, layer: int, h: int, group: int, cand: list[int], t: int, policy: Policy) -> list[float]:
    return [sum(float(c.probs[layer][q, t - 1, j]) for q in range(h * group, (h + 1) * group)) / group for j in cand]


def expected_attention_scores(model, c: Captured, layer: int, h: int, group: int, cand: list[int], t: int,
                              policy: Policy) -> list[float]:
    """Gaussian pre-RoPE queries of the window, rotated by the mean of the next T RoPE rotations."""
    future = policy.params.get("n_future_positions", 512)
    d = c.keys[layer].shape[-1]
    scaling = model.model.layers[layer].self_attn.scaling
    cos, sin = rope_tables(model, torch.arange(t, t + future))
    basis = torch.eye(d)[None, None].expand(1, future, d, d)  # rotating e_j gives column j of R_p
    rotated, _ = apply_rotary_pos_emb(basis, basis, cos, sin, unsqueeze_dim=2)
    rbar = rotated[0].transpose(-1, -2).double().mean(dim=0)
    keys = c.keys[layer][h, cand].double()
    attention = torch.zeros(len(cand), dtype=torch.float64)
    for q in range(h * group, (h + 1) * group):
        window = c.pre_queries[layer][q, t - policy.query_window : t].double()
        mu = window.mean(dim=0)
        sigma = (window - mu).T @ (window - mu) / window.shape[0]
        mu_f, sigma_f = rbar @ mu, rbar @ sigma @ rbar.T
        z = scaling * keys @ mu_f + scaling**2 / 2 * torch.einsum("nd,de,ne->n", keys, sigma_f, keys)
        attention += torch.softmax(z, dim=0) / group
    return (attention * c.values[layer][h, cand].double().norm(dim=-1)).tolist()


def gkv_local(c: Captured, layer: int, h: int, group: int, cand: list[int], t: int, policy: Policy) -> list[float]:
    rows = range(t - policy.query_window, t)
    heads = range(h * group, (h + 1) * group)
    local = [sum(max(float(c.probs[layer][q, i, j]) for q in heads) for i in rows) / len(rows) for j in cand]
    top = max(local)
    return [s / top for s in local]


def gkv_redundancy(keys: Tensor) -> list[float]:
    """R-KV redundancy of position-sorted keys ``[n, d]``: cosine rows summed after zeroing, per key m, the entry of
    its most recent near-duplicate (cos > 0.5); softmax; divided by the maximum."""
    n = keys.shape[0]
    unit = [k / (k.norm() + 1e-8) for k in keys.double()]
    cos = [[float(unit[j] @ unit[m]) if j != m else 0.0 for m in range(n)] for j in range(n)]
    for m in range(n):
        duplicates = [j for j in range(n) if j != m and cos[j][m] > 0.5]
        if duplicates:
            cos[max(duplicates)][m] = 0.0
    raw = [sum(row) / n for row in cos]
    top = max(raw)
    weights = [math.exp(r - top) for r in raw]
    total = sum(weights)
    soft = [w / total for w in weights]
    return [s / max(soft) for s in soft]


# ---------------------------------------------------------------------------------------------------------- events


def select(cand: list[int], scores: list[float], t: int, policy: Policy) -> list[int]:
    """Sinks (the oldest candidates) and recent tokens (positions >= t - recent), then the best scores, older
    first on ties, up to `budget`; sorted by position."""
    protected = set(cand[: policy.sinks]) | {j for j in cand if j >= t - policy.recent}
    rest = sorted((j for j in cand if j not in protected), key=lambda j: (-scores[cand.index(j)], j))
    return sorted(protected | set(rest[: policy.budget - len(protected)]))


@dataclass
class Reference:
    """What the reference decided: per layer, (tokens seen, kept positions per KV head) of every eviction, the
    final visibility masks and the logits of a forward under them."""

    events: list[list[tuple[int, list[list[int]]]]]
    keep: list[Tensor]
    logits: Tensor


def reference_eviction(model, ids: Tensor, prefill: int, policy: Policy) -> Reference:
    cfg = model.config
    seq, layers, h_kv = ids.shape[1], cfg.num_hidden_layers, cfg.num_key_value_heads
    group = cfg.num_attention_heads // h_kv
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    keep = [causal.expand(h_kv, seq, seq).clone() for _ in range(layers)]
    points = [prefill] + list(range(prefill + policy.interval, seq, policy.interval))
    events: list[list[tuple[int, list[list[int]]]]] = [[] for _ in range(layers)]
    accumulated = [[{} for _ in range(h_kv)] for _ in range(layers)]  # H2O: position -> summed attention
    global_score = [[{} for _ in range(h_kv)] for _ in range(layers)]  # G-KV: position -> F
    previous = 0
    for t in points:
        c = eager_forward(model, ids, keep)
        for layer in range(layers):
            kept_heads, evicted = [], False
            for h in range(h_kv):
                cand = [j for j in range(t) if keep[layer][h, t - 1, j]]  # what the newest query sees
                scores = _scores(model, c, layer, h, group, cand, t, previous, policy,
                                 accumulated[layer][h], global_score[layer][h])
                evicted |= len(cand) > policy.budget
                kept = select(cand, scores, t, policy) if len(cand) > policy.budget else cand
                kept_heads.append(kept)
                keep[layer][h, t:, :t] = False
                keep[layer][h, t:, kept] = True
                for state in (accumulated[layer][h], global_score[layer][h]):
                    for j in list(state):
                        if j not in kept:
                            del state[j]
            if evicted:  # kvtrain records an event only when some head held more than the budget
                events[layer].append((t, kept_heads))
        previous = t
    final = eager_forward(model, ids, keep)
    return Reference(events, keep, final.logits)


def _scores(model, c: Captured, layer: int, h: int, group: int, cand: list[int], t: int, previous: int,
            policy: Policy, accumulated: dict, global_score: dict) -> list[float]:
    if policy.scorer == "snapkv":
        return snapkv_scores(c, layer, h, group, cand, t, policy)
    if policy.scorer == "tova":
        return tova_scores(c, layer, h, group, cand, t, policy)
    if policy.scorer == "expected_attention":
        return expected_attention_scores(model, c, layer, h, group, cand, t, policy)
    if policy.scorer == "h2o":
        # Every query since the previous event (within the window) adds its group-mean attention, once.
        rows = range(max(t - policy.query_window, previous), t)
        heads = range(h * group, (h + 1) * group)
        for j in cand:
            added = sum(float(c.probs[layer][q, i, j]) for q in heads for i in rows) / group
            accumulated[j] = accumulated.get(j, 0.0) + added
        return [accumulated[j] for j in cand]
    if policy.scorer == "gkv":
        alpha, mix = policy.params.get("alpha", 0.8), policy.params.get("mix_lambda", 0.5)
        local = gkv_local(c, layer, h, group, cand, t, policy)
        for j, s in zip(cand, local):
            global_score[j] = max(alpha * global_score[j], s) if j in global_score else s
        redundancy = gkv_redundancy(c.keys[layer][h, cand])
        return [mix * global_score[j] - (1 - mix) * r for j, r in zip(cand, redundancy)]
    raise ValueError(f"no reference for scorer {policy.scorer!r}")
