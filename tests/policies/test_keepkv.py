"""KeepKV: the EMA against an explicit loop, the ZIP-merge identity, pairing and vote bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvtrain.policies.base import ScoreInputs
from kvtrain.policies.keepkv import COUNT, LOG_EMA, KeepKVMerger, bias_corrected_log_score, ema_update
from kvtrain.policies.select import select

D = 8
SCALING = D**-0.5


def make_inputs(seed: int, *, b: int = 2, h: int = 2, g: int = 1, n: int = 14, w: int = 4, pad=(0, 3),
                clusters: int = 3, last_event: int = -1, votes: bool = True, dtype=torch.float64) -> ScoreInputs:
    """Keys drawn around a few centres (so that many cosines exceed 0.8); row r is left-padded by pad[r]."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(clusters, D, generator=gen, dtype=dtype)
    which = torch.randint(0, clusters, (b, h, n), generator=gen)
    keys = centres[which] + 0.4 * torch.randn(b, h, n, D, generator=gen, dtype=dtype)
    values = torch.randn(b, h, n, D, generator=gen, dtype=dtype)
    positions = torch.arange(n).expand(b, h, n).clone()
    valid = positions >= torch.tensor(pad)[:, None, None]
    log_votes = torch.log(torch.randint(1, 4, (b, h, n), generator=gen).to(dtype)) if votes else None
    return ScoreInputs(
        keys=keys, values=values, positions=positions, valid=valid,
        has_history=torch.zeros_like(valid),
        queries=torch.randn(b, h * g, w, D, generator=gen, dtype=dtype),
        query_positions=torch.arange(n - w, n), rope_offset=torch.tensor(pad), scaling=SCALING, layer_idx=0,
        last_event_position=last_event, log_votes=None if log_votes is None else log_votes.masked_fill(~valid, 0.0),
    )


def ref_ema(inputs: ScoreInputs, prev_s: torch.Tensor, prev_t: torch.Tensor, alpha: float):
    """The sequential EMA with exact exp-scores summed over the GQA group, one key at a time."""
    b, h, n, _ = inputs.keys.shape
    g = inputs.group_size
    s_out = torch.zeros(b, h, n, dtype=torch.float64)
    t_out = torch.zeros(b, h, n, dtype=torch.long)
    for r in range(b):
        for hd in range(h):
            for i in range(n):
                if not inputs.valid[r, hd, i]:
                    continue
                s, t = (float(prev_s[r, hd, i]), int(prev_t[r, hd, i])) if inputs.has_history[r, hd, i] else (0.0, 0)
                for j, qp in enumerate(inputs.query_positions.tolist()):
                    if qp <= inputs.last_event_position or int(inputs.positions[r, hd, i]) > qp:
                        continue
                    score = sum(
                        math.exp(float(inputs.queries[r, hd * g + gg, j] @ inputs.keys[r, hd, i]) * inputs.scaling)
                        for gg in range(g)
                    )
                    s = alpha * s + (1 - alpha) * score
                    t += 1
                s_out[r, hd, i], t_out[r, hd, i] = s, t
    return s_out, t_out


def attention_output(q: torch.Tensor, keys, values, log_votes, mask) -> torch.Tensor:
    """sum_i p_i s_i v_i / sum_i p_i s_i for one query per (row, head): q [b, h, d] -> [b, h, d]."""
    logits = torch.einsum("bhd,bhnd->bhn", q, keys) * SCALING + log_votes
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhn,bhnd->bhd", probs, values)


def ref_pairing(inputs: ScoreInputs, keep_idx, keep_valid, threshold):
    """merged_into[r, hd, e] = candidate index of the kept key e merges into, or -1."""
    b, h, n, _ = inputs.keys.shape
    out = torch.full((b, h, n), -1, dtype=torch.long)
    for r in range(b):
        for hd in range(h):
            kept = keep_idx[r, hd][keep_valid[r, hd]].tolist()
            for e in range(n):
                if not inputs.valid[r, hd, e] or e in kept or not kept:
                    continue
                cos = [float(F.cosine_similarity(inputs.keys[r, hd, e], inputs.keys[r, hd, c], dim=0)) for c in kept]
                best = max(range(len(kept)), key=lambda m: (cos[m], -m))
                if cos[best] >= threshold:
                    out[r, hd, e] = kept[best]
    return out


def keep_set(inputs: ScoreInputs, budget: int, seed: int):
    scores = torch.rand(inputs.valid.shape, generator=torch.Generator().manual_seed(seed))
    return select(scores, inputs.valid, inputs.positions, budget)


@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_ema_matches_sequential_loop_over_two_events(g, alpha):
    inputs = make_inputs(0, g=g, n=10, w=4)
    log_ema, count = ema_update(inputs, {}, alpha)
    ref_s, ref_t = ref_ema(inputs, torch.zeros(2, 2, 10), torch.zeros(2, 2, 10, dtype=torch.long), alpha)
    valid = inputs.valid
    assert torch.equal(count, ref_t)
    torch.testing.assert_close(torch.exp(log_ema)[valid], ref_s[valid], rtol=1e-10, atol=0)
    assert bool(torch.isneginf(log_ema[~valid]).all())

    # second event: 6 kept keys per head carry their state, 5 new keys arrive at columns 10..14, and the window
    # of 6 queries (columns 9..14) holds one query already folded in at the first event
    keep_idx, keep_valid = keep_set(inputs, 6, 1)
    gen = torch.Generator().manual_seed(1)

    def carry(t: torch.Tensor) -> torch.Tensor:  # gather at the kept indices, zero for the 5 new keys
        return torch.cat([t.gather(2, keep_idx).masked_fill(~keep_valid, 0), torch.zeros_like(t[:, :, :5])], dim=2)

    kept_keys = inputs.keys.gather(2, keep_idx[..., None].expand(-1, -1, -1, D))
    keys = torch.cat([kept_keys, torch.randn(2, 2, 5, D, generator=gen, dtype=torch.float64)], dim=2)
    history = torch.cat([keep_valid, torch.zeros(2, 2, 5, dtype=torch.bool)], dim=2)
    valid2 = history | (torch.arange(11) >= 6)
    positions = torch.cat([inputs.positions.gather(2, keep_idx), torch.arange(10, 15).expand(2, 2, 5)], dim=2)
    second = ScoreInputs(
        keys=keys, values=torch.zeros_like(keys), positions=positions.masked_fill(~valid2, -1), valid=valid2,
        has_history=history, queries=torch.randn(2, 2 * g, 6, D, generator=gen, dtype=torch.float64),
        query_positions=torch.arange(9, 15), rope_offset=inputs.rope_offset, scaling=SCALING, layer_idx=0,
        last_event_position=9,
    )
    state = {LOG_EMA: carry(log_ema.masked_fill(~valid, 0.0)), COUNT: carry(count)}
    log_ema2, count2 = ema_update(second, state, alpha)
    ref_s2, ref_t2 = ref_ema(second, carry(ref_s), carry(ref_t), alpha)
    assert torch.equal(count2, ref_t2)
    torch.testing.assert_close(torch.exp(log_ema2)[valid2], ref_s2[valid2], rtol=1e-10, atol=0)
    shat = torch.exp(bias_corrected_log_score(log_ema2, count2, alpha))
    torch.testing.assert_close(shat[valid2], (ref_s2 / (1 - alpha ** ref_t2.double()))[valid2], rtol=1e-10, atol=0)


def test_ema_is_stable_for_huge_logits():
    """Adding a constant C to every logit (an extra key coordinate) must shift ln S by exactly C, even when
    exp(C) overflows."""
    base = make_inputs(2, g=2, dtype=torch.float32)
    shifted = {}
    for c in (0.0, 5000.0):
        keys = torch.cat([base.keys, torch.full_like(base.keys[..., :1], c / SCALING)], dim=-1)
        queries = torch.cat([base.queries, torch.ones_like(base.queries[..., :1])], dim=-1)
        inputs = ScoreInputs(**{**base.__dict__, "keys": keys, "queries": queries})
        shifted[c], _ = ema_update(inputs, {}, 0.9)
    valid = base.valid
    assert bool(torch.isfinite(shifted[5000.0][valid]).all())
    torch.testing.assert_close(shifted[5000.0][valid] - 5000.0, shifted[0.0][valid], rtol=0, atol=2e-3)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zip_merge_identity_when_everything_merges(seed, dtype):
    """alpha = 0: s^ are the exact exp-scores of the last window query q, so the attention output of q over
    the merged cache (with votes) equals its output over every candidate before the event."""
    inputs = make_inputs(seed, dtype=dtype)
    keep_idx, keep_valid = keep_set(inputs, 4, seed)
    keys, values, log_votes, state = KeepKVMerger(threshold=-1.0, ema_alpha=0.0, max_rescale=float("inf"))(inputs, {}, keep_idx, keep_valid)
    q = inputs.queries[:, :, -1]
    before = attention_output(q, inputs.keys, inputs.values, inputs.log_votes, inputs.valid)
    after = attention_output(q, keys, values, log_votes, keep_valid)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    # every original is represented: kept votes add up to all votes of the row
    torch.testing.assert_close(
        torch.exp(log_votes).masked_fill(~keep_valid, 0).sum(-1),
        torch.exp(inputs.log_votes).masked_fill(~inputs.valid, 0).sum(-1),
    )
    # the merged entries' predicted score is the true score of their new key for q
    shat = bias_corrected_log_score(state[LOG_EMA], state[COUNT], 0.0)
    logit = torch.einsum("bhd,bhkd->bhk", q, keys) * SCALING
    torch.testing.assert_close(shat[keep_valid], logit[keep_valid], rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_zip_merge_with_threshold_matches_brute_force_pairing(seed):
    inputs = make_inputs(seed, n=16)
    keep_idx, keep_valid = keep_set(inputs, 5, seed)
    merger = KeepKVMerger(threshold=0.8, ema_alpha=0.0, max_rescale=float("inf"))
    keys, values, log_votes, _ = merger(inputs, {}, keep_idx, keep_valid)
    merged_into = ref_pairing(inputs, keep_idx, keep_valid, 0.8)
    b, h, k = keep_idx.shape
    expected_votes = torch.zeros(b, h, k, dtype=torch.float64)
    absorbed = torch.zeros(b, h, k, dtype=torch.long)
    for r in range(b):
        for hd in range(h):
            for slot in range(k):
                if not keep_valid[r, hd, slot]:
                    continue
                c = int(keep_idx[r, hd, slot])
                group = [c] + torch.nonzero(merged_into[r, hd] == c).flatten().tolist()
                expected_votes[r, hd, slot] = sum(math.exp(float(inputs.log_votes[r, hd, i])) for i in group)
                absorbed[r, hd, slot] = len(group) - 1
    assert int(absorbed.max()) >= 2, "the data must exercise several entries merged into one"
    assert int((absorbed == 0)[keep_valid].sum()) >= 1 and bool((merged_into == -1)[inputs.valid].any())
    torch.testing.assert_close(torch.exp(log_votes)[keep_valid], expected_votes[keep_valid])
    # kept entries that absorbed nothing are returned bit-identical
    untouched = keep_valid & (absorbed == 0)
    gathered_keys = inputs.keys.gather(2, keep_idx[..., None].expand(-1, -1, -1, D))
    gathered_values = inputs.values.gather(2, keep_idx[..., None].expand(-1, -1, -1, D))
    assert torch.equal(keys[untouched], gathered_keys[untouched])
    assert torch.equal(values[untouched], gathered_values[untouched])
    assert torch.equal(log_votes[untouched], inputs.log_votes.gather(2, keep_idx)[untouched])
    # identity over the represented entries (kept + merged); dropped ones are simply gone
    represented = inputs.valid & ((merged_into >= 0) | torch.zeros_like(inputs.valid).scatter(2, keep_idx, keep_valid))
    q = inputs.queries[:, :, -1]
    before = attention_output(q, inputs.keys, inputs.values, inputs.log_votes, represented)
    after = attention_output(q, keys, values, log_votes, keep_valid)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert torch.equal(keys[~keep_valid], torch.zeros_like(keys[~keep_valid]))


def test_merged_state_predicts_vote_weighted_score():
    """alpha = 0.9: the state handed to the next event un-biases to sum_M p_i s^_i / sum_M p_i for each kept
    entry (s^ from an independent sequential EMA), and keeps the survivor's update count."""
    inputs = make_inputs(4, n=16)
    keep_idx, keep_valid = keep_set(inputs, 5, 4)
    _, _, _, state = KeepKVMerger(threshold=0.8, ema_alpha=0.9)(inputs, {}, keep_idx, keep_valid)
    b, h, n = inputs.valid.shape
    ref_s, ref_t = ref_ema(inputs, torch.zeros(b, h, n), torch.zeros(b, h, n, dtype=torch.long), 0.9)
    shat = ref_s / (1 - 0.9 ** ref_t.double())
    p = torch.exp(inputs.log_votes)
    merged_into = ref_pairing(inputs, keep_idx, keep_valid, 0.8)
    got = torch.exp(bias_corrected_log_score(state[LOG_EMA], state[COUNT], 0.9))
    checked_merged = 0
    for r in range(b):
        for hd in range(h):
            for slot in range(keep_idx.shape[2]):
                if not keep_valid[r, hd, slot]:
                    continue
                c = int(keep_idx[r, hd, slot])
                group = [c] + torch.nonzero(merged_into[r, hd] == c).flatten().tolist()
                weighted = sum(float(p[r, hd, i] * shat[r, hd, i]) for i in group)
                expected = weighted / sum(float(p[r, hd, i]) for i in group)
                assert float(got[r, hd, slot]) == pytest.approx(expected, rel=1e-9)
                assert int(state[COUNT][r, hd, slot]) == int(ref_t[r, hd, c])
                checked_merged += len(group) > 1
    assert checked_merged > 0


def test_unit_votes_count_represented_entries():
    inputs = make_inputs(7, n=16, votes=False)
    keep_idx, keep_valid = keep_set(inputs, 5, 7)
    _, _, log_votes, _ = KeepKVMerger(threshold=0.5)(inputs, {}, keep_idx, keep_valid)
    merged_into = ref_pairing(inputs, keep_idx, keep_valid, 0.5)
    represented = keep_valid.sum(-1) + (merged_into >= 0).sum(-1)
    torch.testing.assert_close(torch.exp(log_votes).masked_fill(~keep_valid, 0).sum(-1), represented.double())


def test_near_zero_log_scores_fall_back_to_weighted_mean_key():
    """Keys orthogonal to every query: all logits are 0, the rescale denominator vanishes, and the merged key
    is the vote-weighted mean (weights p_i * s_i with s_i = 1)."""
    inputs = make_inputs(3, h=1, b=1, pad=(0,), clusters=1)
    inputs.keys[..., 0] = 0.0
    inputs.queries.zero_()
    inputs.queries[..., 0] = 1.0
    keep_idx = torch.tensor([[[2]]])
    keep_valid = torch.ones(1, 1, 1, dtype=torch.bool)
    keys, values, log_votes, _ = KeepKVMerger(threshold=-1.0)(inputs, {}, keep_idx, keep_valid)
    p = torch.exp(inputs.log_votes)[0, 0]
    assert bool(torch.isfinite(keys).all())
    torch.testing.assert_close(keys[0, 0, 0], (p[:, None] * inputs.keys[0, 0]).sum(0) / p.sum())
    torch.testing.assert_close(values[0, 0, 0], (p[:, None] * inputs.values[0, 0]).sum(0) / p.sum())
    torch.testing.assert_close(log_votes[0, 0, 0], torch.log(p.sum()))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="threshold"):
        KeepKVMerger(threshold=1.5)
    with pytest.raises(ValueError, match="ema_alpha"):
        KeepKVMerger(ema_alpha=1.0)
    inputs = make_inputs(0)
    keep_idx, keep_valid = keep_set(inputs, 4, 0)
    with pytest.raises(ValueError, match="keep_idx"):
        KeepKVMerger()(inputs, {}, keep_idx[:1], keep_valid[:1])
    history = ScoreInputs(**{**inputs.__dict__, "has_history": inputs.valid.clone()})
    with pytest.raises(ValueError, match="state must hold"):
        KeepKVMerger()(history, {}, keep_idx, keep_valid)
    stale = ScoreInputs(**{**inputs.__dict__, "last_event_position": 100})
    with pytest.raises(ValueError, match="never seen"):
        KeepKVMerger()(stale, {}, keep_idx, keep_valid)


@pytest.mark.parametrize("seed", range(4))
def test_trust_region_bounds_the_key_rescale(seed):
    """Each merged key is its group's vote-and-score-weighted mean key times a factor in [1/1.25, 1.25]
    (1 when the paper's factor falls outside): checked against the weighted mean computed here by hand."""
    inputs = make_inputs(seed)
    keep_idx, keep_valid = keep_set(inputs, 4, seed)
    keys, _, _, _ = KeepKVMerger(threshold=0.5, ema_alpha=0.0, max_rescale=1.25)(inputs, {}, keep_idx, keep_valid)
    paper, _, _, _ = KeepKVMerger(threshold=0.5, ema_alpha=0.0, max_rescale=float("inf"))(inputs, {}, keep_idx, keep_valid)
    merged_into = ref_pairing(inputs, keep_idx, keep_valid, 0.5)
    q = inputs.queries[:, :, -1]  # alpha = 0: the predicted scores are the last query's
    factors = []
    b, h, _, _ = inputs.keys.shape
    for r in range(b):
        for hd in range(h):
            for slot in range(keep_idx.shape[-1]):
                if not keep_valid[r, hd, slot]:
                    continue
                c = int(keep_idx[r, hd, slot])
                group = [c] + [e for e in range(inputs.keys.shape[2]) if merged_into[r, hd, e] == c]
                if len(group) == 1:
                    continue
                weights = torch.stack(
                    [inputs.log_votes[r, hd, i].exp() * torch.exp(q[r, hd] @ inputs.keys[r, hd, i] * SCALING) for i in group]
                )
                mean = (weights[:, None] * inputs.keys[r, hd, group]).sum(0) / weights.sum()
                out = keys[r, hd, slot]
                assert float(F.cosine_similarity(out, mean, dim=0)) > 1 - 1e-9
                factor = float(out.norm() / mean.norm())
                assert 1 / 1.25 - 1e-9 <= factor <= 1.25 + 1e-9
                factors.append((factor, float(paper[r, hd, slot].norm() / mean.norm())))
    assert factors
    # where the paper's factor left the region the key stayed the weighted mean; elsewhere both agree
    for bounded, unbounded in factors:
        assert bounded == pytest.approx(unbounded, abs=1e-9) or (bounded == pytest.approx(1.0, abs=1e-9) and not 0.8 <= unbounded <= 1.25)
