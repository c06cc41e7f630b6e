"""KeepKV (AAAI-26): electoral votes plus Zero Inference-Perturbation merging of evicted keys.

Each cache entry represents ``p`` original tokens (its vote count, carried as ``log_votes = ln p``; the
attention adds ``ln p`` to the logits, so ``o = sum_i p_i s_i v_i / sum_i p_i s_i``). At a compression
event every evicted entry ``e`` either disappears (its best cosine with a kept key is below ``threshold``)
or is ZIP-merged into the kept entry ``c`` whose key is most similar, so that for the current query the
attention output is unchanged when the predicted scores are exact.

**Predicted scores.** ``s_t(i) = sum_{g in GQA group} exp(q_{g,t} . k_i * scaling)``: the paper has no GQA;
summing the group's unnormalised scores keeps one vote count and one prediction per KV head (the ZIP
identity below is then exact for one query head per KV head and approximate for larger groups, since the
log of a sum of exponentials is not linear in the key). The EMA ``S = alpha S + (1 - alpha) s_t`` runs over
the window queries newer than the previous event that can see the key, starting from ``S = 0`` for keys
without history; each key counts its own updates ``t_i`` and ``s^_i = S_i / (1 - alpha^t_i)``. Everything is
carried in log space (``ln S`` and ``t``), because ``exp`` of raw logits overflows and the merge only ever
needs ``ln s^`` and ratios of weights: ``ln S`` is a logsumexp, never an exponential.

**ZIP-merging a set.** For a kept entry c and the set M = {c} + {entries merged into c}, with
``w_i = p_i s^_i``::

    p_r = sum_M p_i,    v_r = sum_M w_i v_i / sum_M w_i,
    k_r = (sum_M w_i k_i) * ln(sum_M w_i / sum_M p_i) / (sum_M w_i ln s^_i)

For two entries this is the paper's Eq. 7; for a set it is the same formula with the sums taken over the
set. (Merging pairwise in sequence gives the same current-query logit but a different key direction that
depends on the order, because each intermediate key is already rescaled; the closed form has no order.)
*Identity.* Suppose ``s^_i = s_i = exp(q . k_i * scaling)`` for the current query q, i.e.
``ln s^_i = q . k_i * scaling``. Then ``q . k_r * scaling = (sum w_i q . k_i * scaling) * ln(W / P) /
(sum w_i ln s^_i) = ln(W / P)`` with ``W = sum w_i``, ``P = sum p_i``, hence ``p_r s_r = P * W / P = W =
sum_M p_i s_i`` and ``p_r s_r v_r = sum_M w_i v_i = sum_M p_i s_i v_i``: both sums of the attention output
``sum p s v / sum p s`` are unchanged, so the output is unchanged. Only the ratio of the two weighted sums
matters, so the weights are normalised (``w_i / W``, a softmax of ``ln p_i + ln s^_i``) and never
exponentiated raw. The merged entry's predicted score is ``W / P`` (its ``ln S`` is set so that the bias
correction with the survivor's count gives back exactly ``W / P``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvtrain.policies.base import ScoreInputs

LOG_EMA = "keepkv_log_ema"  # ln S per entry (the biased EMA of exp-scores)
COUNT = "keepkv_count"  # number of EMA updates each entry has had (long)

# Below this |sum_i (w_i / W) ln s^_i| the rescale factor of the merged key is ill-conditioned (logits near 0
# make numerator and denominator both tiny); such merges keep the weighted-mean key instead, giving up
# exactness for that query to avoid a key blown up by a near-zero division.
MIN_MEAN_LOG_SCORE = 1e-4


def ema_update(inputs: ScoreInputs, state: dict[str, Tensor], alpha: float) -> tuple[Tensor, Tensor]:
    """Fold the window queries newer than ``inputs.last_event_position`` into each candidate's EMA.

    ``state`` holds ``LOG_EMA`` and ``COUNT`` ``[b, h_kv, n]`` aligned with the candidates (zero where
    ``has_history`` is False), or neither before the first event. Returns ``(log_ema, count)``
    ``[b, h_kv, n]``; invalid slots and keys never updated have ``log_ema = -inf`` and ``count = 0``.

    The update is the closed form of the sequential EMA: the queries that see key i are a suffix of the m
    new queries (they are in position order and causal), so after them
    ``S_i = alpha^{c_i} S_i' + sum_{j sees i} (1 - alpha) alpha^{m-1-j} s_j(i)`` with ``c_i`` that suffix's length.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"ema_alpha={alpha} must be in [0, 1)")
    qpos = inputs.query_positions
    if qpos.numel() > 1 and not bool((qpos[1:] > qpos[:-1]).all()):
        raise ValueError("query_positions must be strictly increasing")
    dtype = torch.promote_types(inputs.keys.dtype, torch.float32)
    prev_log, prev_count = _previous_state(inputs, state, dtype)

    fresh = qpos > inputs.last_event_position
    q = inputs.grouped_queries()[:, :, :, fresh].to(dtype)  # [b, h, g, m, d]
    qpos = qpos[fresh]
    m = qpos.numel()
    log_s = torch.logsumexp(torch.einsum("bhgmd,bhnd->bhgmn", q, inputs.keys.to(dtype)) * inputs.scaling, dim=2)
    sees = inputs.valid[:, :, None, :] & (inputs.positions[:, :, None, :] <= qpos[None, None, :, None])
    # log(alpha ** e) rather than e * log(alpha): alpha = 0 must give log(1) = 0 for e = 0, not nan.
    decay = torch.log(torch.pow(alpha, torch.arange(m - 1, -1, -1, device=q.device, dtype=dtype)))
    terms = (log_s + (decay + math.log1p(-alpha))[:, None]).masked_fill(~sees, float("-inf"))
    n_updates = sees.sum(dim=2)
    carried = torch.log(torch.pow(alpha, n_updates.to(dtype))) + prev_log
    log_ema = torch.logsumexp(torch.cat([terms, carried[:, :, None]], dim=2), dim=2)
    return log_ema, prev_count + n_updates


def bias_corrected_log_score(log_ema: Tensor, count: Tensor, alpha: float) -> Tensor:
    """``ln s^ = ln S - ln(1 - alpha^t)`` ``[b, h_kv, n]``; ``-inf`` where ``count`` is 0."""
    correction = torch.log1p(-torch.pow(alpha, count.to(log_ema.dtype)))
    return torch.where(count > 0, log_ema - correction, float("-inf"))


@dataclass
class KeepKVMerger:
    """ZIP-merge the evicted entries of one event into their most similar kept entries.

    ``threshold``: minimum cosine between an evicted key and its best kept key for a merge (paper: 0.8);
    ``ema_alpha``: EMA factor of the score prediction (not given in the paper's main text);
    ``max_rescale``: trust region of the ZIP key rescale. The paper's factor ``ln(W/P) / sum_i (w_i/W) ln s^_i``
    makes the merged key exact for the *predicted* query, but when the mean log-score is small it stretches
    the key several-fold, which wrecks every later query (on SmolLM2 it multiplied the loyalty KL of SnapKV
    at 50% eviction by 7). Factors outside ``[1/max_rescale, max_rescale]`` keep the weighted-mean key
    (still with the summed votes); 1.25 measured best (KL 0.169 vs 0.197 without merging, 0.173 never
    rescaling). ``inf`` is the paper's formula.
    """

    threshold: float = 0.8
    ema_alpha: float = 0.9
    max_rescale: float = 1.25

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be a cosine in [-1, 1]")
        if not 0.0 <= self.ema_alpha < 1.0:
            raise ValueError(f"ema_alpha={self.ema_alpha} must be in [0, 1)")
        if not self.max_rescale >= 1.0:
            raise ValueError(f"max_rescale={self.max_rescale} must be >= 1")

    def __call__(
        self, inputs: ScoreInputs, state: dict[str, Tensor], keep_idx: Tensor, keep_valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Returns ``(keys, values, log_votes, state_kept)``: ``[b, h_kv, k, d]``, ``[b, h_kv, k, d]``,
        ``[b, h_kv, k]`` and ``{LOG_EMA, COUNT}`` ``[b, h_kv, k]``, aligned with ``keep_idx``/``keep_valid``
        ``[b, h_kv, k]`` (the output of `kvtrain.policies.select.select`). Kept entries that absorbed nothing
        come back bit-identical; unused slots are zero.

        Pairing: each valid evicted entry takes the kept key (same row and KV head) of largest cosine, the
        older one on ties; it merges when that cosine is ``>= threshold`` and is dropped otherwise.
        """
        b, h, n, d = inputs.keys.shape
        if keep_idx.shape != keep_valid.shape or keep_idx.shape[:2] != (b, h) or keep_valid.dtype != torch.bool:
            raise ValueError(
                f"keep_idx {tuple(keep_idx.shape)} / keep_valid {tuple(keep_valid.shape)} {keep_valid.dtype} "
                f"must be [b={b}, h_kv={h}, k] long / bool"
            )
        k = keep_idx.shape[2]
        alpha = self.ema_alpha
        log_ema, count = ema_update(inputs, state, alpha)
        valid = inputs.valid
        if bool((valid & (count == 0)).any()):
            raise ValueError("KeepKV: a valid key was never seen by a window query, so it has no predicted score; "
                             "the window must hold at least one query newer than the previous event")
        log_score = bias_corrected_log_score(log_ema, count, alpha)
        dtype = log_ema.dtype
        log_votes = torch.zeros_like(log_score) if inputs.log_votes is None else inputs.log_votes.to(dtype)

        # slot[i] = kept slot of candidate i, k for "not kept" (an extra column swallows unused keep slots).
        slot = torch.full((b, h, n + 1), k, dtype=torch.long, device=keep_idx.device)
        slot.scatter_(2, keep_idx.masked_fill(~keep_valid, n), torch.arange(k, device=keep_idx.device).expand(b, h, k))
        slot = slot[:, :, :n]
        kept = slot < k
        if int(kept.sum()) != int(keep_valid.sum()) or bool((kept & ~valid).any()):
            raise ValueError("keep_idx must name distinct valid candidates where keep_valid is True")

        keys = inputs.keys.to(dtype)
        gather = keep_idx[..., None].expand(b, h, k, d)
        kept_keys = keys.gather(2, gather)
        cos = torch.einsum("bhnd,bhkd->bhnk", F.normalize(keys, dim=-1), F.normalize(kept_keys, dim=-1))
        cos = cos.masked_fill(~keep_valid[:, :, None, :], float("-inf"))
        if k:
            best = cos.argmax(dim=-1)  # first maximum = oldest kept key, since keep_idx is position-sorted
            merges = valid & ~kept & (cos.gather(-1, best[..., None])[..., 0] >= self.threshold)
        else:
            best, merges = slot, torch.zeros_like(valid)
        group = torch.where(kept, slot, torch.where(merges, best, k))  # k = the discard bucket
        member = kept | merges

        log_w = torch.where(member, log_votes + log_score, float("-inf"))
        log_total_w = _scatter_logsumexp(log_w, group, k + 1)
        log_total_p = _scatter_logsumexp(torch.where(member, log_votes, float("-inf")), group, k + 1)
        share = torch.where(member, torch.exp(log_w - log_total_w.gather(2, group)), 0.0)  # w_i / W
        mean_key = _scatter_sum(share[..., None] * keys, group, k + 1)
        mean_value = _scatter_sum(share[..., None] * inputs.values.to(dtype), group, k + 1)
        mean_log_score = _scatter_sum(torch.where(member, share * log_score, 0.0), group, k + 1)
        absorbed = _scatter_sum(merges.to(dtype), group, k + 1)[:, :, :k] > 0

        target = (log_total_w - log_total_p)[:, :, :k]  # ln(W / P): the merged key's logit for the query
        denom = mean_log_score[:, :, :k]
        conditioned = denom.abs() >= MIN_MEAN_LOG_SCORE
        raw_scale = target / torch.where(conditioned, denom, 1.0)
        trusted = conditioned
        if self.max_rescale != float("inf"):
            trusted = trusted & (raw_scale >= 1.0 / self.max_rescale) & (raw_scale <= self.max_rescale)
        scale = torch.where(trusted, raw_scale, 1.0)
        merged_keys = mean_key[:, :, :k] * scale[..., None]

        kept_values = inputs.values.to(dtype).gather(2, gather)
        kept_count = count.gather(2, keep_idx)
        out_keys = torch.where(absorbed[..., None], merged_keys, kept_keys)
        out_values = torch.where(absorbed[..., None], mean_value[:, :, :k], kept_values)
        out_log_votes = torch.where(absorbed, log_total_p[:, :, :k], log_votes.gather(2, keep_idx))
        # Merged entries predict W / P; store ln S so that the survivor's count un-biases back to it.
        merged_log_ema = target + torch.log1p(-torch.pow(alpha, kept_count.to(dtype)))
        out_log_ema = torch.where(absorbed, merged_log_ema, log_ema.gather(2, keep_idx))

        unused = ~keep_valid
        state_kept = {LOG_EMA: out_log_ema.masked_fill(unused, 0.0), COUNT: kept_count.masked_fill(unused, 0)}
        return (
            out_keys.masked_fill(unused[..., None], 0.0).to(inputs.keys.dtype),
            out_values.masked_fill(unused[..., None], 0.0).to(inputs.values.dtype),
            out_log_votes.masked_fill(unused, 0.0),
            state_kept,
        )


def _previous_state(inputs: ScoreInputs, state: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(ln S', t')`` of the previous event, ``(-inf, 0)`` for keys without history."""
    shape = inputs.valid.shape
    if LOG_EMA not in state or COUNT not in state:
        if bool(inputs.has_history.any()):
            raise ValueError(f"KeepKV state must hold {LOG_EMA!r} and {COUNT!r} once keys have history")
        return torch.full(shape, float("-inf"), dtype=dtype, device=inputs.keys.device), torch.zeros_like(
            inputs.positions
        )
    for name in (LOG_EMA, COUNT):
        if state[name].shape != shape:
            raise ValueError(f"state[{name!r}] has shape {tuple(state[name].shape)}, expected {tuple(shape)}")
    carried = inputs.has_history & inputs.valid & (state[COUNT] > 0)
    prev_log = torch.where(carried, state[LOG_EMA].to(dtype), float("-inf"))
    return prev_log, torch.where(carried, state[COUNT].long(), 0)


def _scatter_sum(x: Tensor, index: Tensor, size: int) -> Tensor:
    """Sum of ``x`` ``[b, h, n, ...]`` into ``size`` buckets along dim 2 given ``index`` ``[b, h, n]``."""
    out = x.new_zeros(x.shape[:2] + (size,) + x.shape[3:])
    return out.scatter_add(2, index.view(index.shape + (1,) * (x.dim() - 3)).expand_as(x), x)


def _scatter_logsumexp(x: Tensor, index: Tensor, size: int) -> Tensor:
    """``ln sum exp(x)`` per bucket ``[b, h, size]``; ``-inf`` for empty buckets."""
    peak = x.new_full(x.shape[:2] + (size,), float("-inf")).scatter_reduce(2, index, x, "amax")
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    total = _scatter_sum(torch.exp(x - peak.gather(2, index)), index, size)
    return torch.log(total) + peak
