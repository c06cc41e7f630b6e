"""Selection against brute-force references written with loops and sorted()."""

from __future__ import annotations

import pytest
import torch

from kvtrain.policies.select import protected_mask, select


def make_candidates(seed: int, b: int, h: int, n: int, *, p_valid: float = 0.75, same_heads: bool = False):
    """Ragged candidates: valid keys at increasing columns, invalid slots (position -1) interspersed, integer
    scores so that ties are frequent."""
    gen = torch.Generator().manual_seed(seed)
    hh = 1 if same_heads else h
    valid = torch.rand(b, hh, n, generator=gen) < p_valid
    pad = torch.randint(0, 4, (b, 1, 1), generator=gen)
    positions = torch.cumsum(torch.randint(1, 3, (b, hh, n), generator=gen), dim=-1) + pad
    positions = positions.masked_fill(~valid, -1)
    scores = torch.randint(0, 5, (b, h, n), generator=gen).float()
    scores = scores.masked_fill(~valid.expand(b, h, n), float("nan"))  # selection must ignore invalid slots
    return scores, valid.expand(b, h, n).clone(), positions.expand(b, h, n).clone()


def head_order(scores, valid, positions, protected, r, hd):
    """Protected keys, then the rest by score (older first on ties)."""
    cands = [j for j in range(scores.shape[2]) if valid[r, hd, j]]
    prot = [j for j in cands if protected[r, hd, j]]
    rest = sorted((j for j in cands if not protected[r, hd, j]),
                  key=lambda j: (-float(scores[r, hd, j]), int(positions[r, hd, j])))
    return cands, prot + rest


def ref_per_head(scores, valid, positions, protected, budget):
    b, h, _ = scores.shape
    out = {}
    for r in range(b):
        for hd in range(h):
            cands, order = head_order(scores, valid, positions, protected, r, hd)
            out[r, hd] = order[: min(budget, len(cands))]
    return out


def ref_head_adaptive(scores, valid, positions, protected, budget, safeguard):
    b, h, _ = scores.shape
    out = {}
    for r in range(b):
        total_valid, guaranteed = 0, 0
        pool = []
        for hd in range(h):
            cands, order = head_order(scores, valid, positions, protected, r, hd)
            n_prot = sum(1 for j in cands if protected[r, hd, j])
            g = min(max(n_prot, int(safeguard * budget)), len(cands))
            out[r, hd] = order[:g]
            pool += [(hd, j) for j in order[g:]]
            total_valid += len(cands)
            guaranteed += g
        pool.sort(key=lambda hj: (-float(scores[r, hj[0], hj[1]]), int(positions[r, hj[0], hj[1]]), hj[0]))
        for hd, j in pool[: min(h * budget, total_valid) - guaranteed]:
            out[r, hd].append(j)
    return out


def span_of(pos, spans):
    ids = [i for i, (start, _) in enumerate(spans) if start <= pos]
    return ids[-1] if ids else 0


def ref_fair(scores, valid, positions, protected, budget, spans):
    b, h, n = scores.shape
    out = {}
    for r in range(b):
        for hd in range(h):
            cands = [j for j in range(n) if valid[r, hd, j]]
            members = [[j for j in cands if span_of(int(positions[r, hd, j]), spans) == i] for i in range(len(spans))]
            kept = min(budget, len(cands))
            quota = [kept * len(m) // max(len(cands), 1) for m in members]
            remainder = kept - sum(quota)
            for i in reversed(range(len(spans))):
                extra = min(remainder, len(members[i]) - quota[i])
                quota[i] += extra
                remainder -= extra
            chosen = []
            for i, m in enumerate(members):
                prot = [j for j in m if protected[r, hd, j]]
                rest = sorted((j for j in m if not protected[r, hd, j]),
                              key=lambda j: (-float(scores[r, hd, j]), int(positions[r, hd, j])))
                chosen += (prot + rest)[: quota[i]]
            out[r, hd] = chosen
    return out


def assert_matches(keep_idx, keep_valid, positions, expected):
    b, h, k = keep_idx.shape
    assert k == max(len(v) for v in expected.values())
    assert bool((keep_idx[~keep_valid] == 0).all())
    for (r, hd), chosen in expected.items():
        got = keep_idx[r, hd][keep_valid[r, hd]].tolist()
        assert got == sorted(chosen, key=lambda j: int(positions[r, hd, j])), (r, hd)
        # ragged validity: used slots come first
        assert keep_valid[r, hd].tolist() == [True] * len(chosen) + [False] * (k - len(chosen))


def random_protected(seed, valid, max_per_head):
    gen = torch.Generator().manual_seed(seed)
    prot = (torch.rand(valid.shape, generator=gen) < 0.15) & valid
    # trim to at most max_per_head per (row, head)
    return prot & (torch.cumsum(prot.long(), dim=-1) <= max_per_head)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [1, 5, 12, 40])
def test_per_head_matches_reference(seed, budget):
    scores, valid, positions = make_candidates(seed, b=3, h=4, n=30)
    protected = random_protected(seed, valid, min(budget, 3))
    keep_idx, keep_valid = select(scores, valid, positions, budget, protected=protected)
    assert_matches(keep_idx, keep_valid, positions, ref_per_head(scores, valid, positions, protected, budget))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [3, 10, 40])
def test_per_layer_matches_reference(seed, budget):
    scores, valid, positions = make_candidates(seed, b=3, h=4, n=30, same_heads=True)
    protected = random_protected(seed, valid[:, :1], 2).expand_as(valid)
    keep_idx, keep_valid = select(scores, valid, positions, budget, protected=protected, mode="per_layer")
    mean = torch.nan_to_num(scores).mean(dim=1, keepdim=True)
    single = ref_per_head(mean, valid[:, :1], positions[:, :1], protected[:, :1], budget)
    expected = {(r, hd): single[r, 0] for r in range(3) for hd in range(4)}
    assert_matches(keep_idx, keep_valid, positions, expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("budget", "safeguard"), [(4, 0.2), (10, 0.5), (10, 0.0), (30, 0.2), (6, 1.0)])
def test_head_adaptive_matches_reference(seed, budget, safeguard):
    scores, valid, positions = make_candidates(seed, b=3, h=4, n=24)
    # make heads differ in scale so that the global top-k really moves budget between heads
    scores = scores * torch.tensor([1.0, 3.0, 0.5, 2.0])[None, :, None]
    protected = random_protected(seed, valid, 2)
    keep_idx, keep_valid = select(scores, valid, positions, budget, protected=protected, mode="head_adaptive",
                                  safeguard=safeguard)
    expected = ref_head_adaptive(scores, valid, positions, protected, budget, safeguard)
    assert_matches(keep_idx, keep_valid, positions, expected)
    for r in range(3):
        assert int(keep_valid[r].sum()) == min(4 * budget, int(valid[r].sum()))


def test_head_adaptive_is_ragged_and_safeguarded():
    scores = torch.zeros(1, 2, 10)
    scores[0, 0] = 10.0 + torch.arange(10.0)  # head 0 dominates every global comparison
    valid = torch.ones(1, 2, 10, dtype=torch.bool)
    positions = torch.arange(10).expand(1, 2, 10)
    keep_idx, keep_valid = select(scores, valid, positions, 5, mode="head_adaptive", safeguard=0.4)
    assert keep_valid.sum(dim=-1).tolist() == [[8, 2]]
    assert keep_idx[0, 1, :2].tolist() == [0, 1]  # head 1's equal scores: the oldest keys win


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spans", [[(5, 20), (20, 70)], [(0, 8), (15, 30), (31, 35)], [(40, 45)]])
@pytest.mark.parametrize("mode", ["per_head", "per_layer"])
def test_fair_spans_match_reference(seed, spans, mode):
    scores, valid, positions = make_candidates(seed, b=2, h=3, n=40, same_heads=mode == "per_layer")
    protected = positions == positions.max()  # the newest key, like a recent window
    budget = 13
    keep_idx, keep_valid = select(scores, valid, positions, budget, protected=protected, mode=mode, spans=spans)
    if mode == "per_layer":
        mean = torch.nan_to_num(scores).mean(dim=1, keepdim=True)
        single = ref_fair(mean, valid[:, :1], positions[:, :1], protected[:, :1], budget, spans)
        expected = {(r, hd): single[r, 0] for r in range(2) for hd in range(3)}
    else:
        expected = ref_fair(scores, valid, positions, protected, budget, spans)
    assert_matches(keep_idx, keep_valid, positions, expected)


def test_fair_quotas_exact_counts():
    # 3 template tokens, then a defense span [3, 13) and an instruction span [13, 43); low scores on the defense
    n = 43
    positions = torch.arange(n).expand(1, 2, n)
    valid = torch.ones(1, 2, n, dtype=torch.bool)
    scores = torch.rand(1, 2, n, generator=torch.Generator().manual_seed(0))
    scores[..., :13] -= 10.0
    keep_idx, keep_valid = select(scores, valid, positions, 20, spans=[(3, 13), (13, 43)])
    kept = positions[0, 0][keep_idx[0][keep_valid[0]].view(2, -1)]
    # earlier = [0, 13): floor(20 * 13 / 43) = 6; later gets the other 14
    assert ((kept < 13).sum(dim=-1)).tolist() == [6, 6]
    assert ((kept >= 13).sum(dim=-1)).tolist() == [14, 14]
    unfair_idx, unfair_valid = select(scores, valid, positions, 20)
    assert int((unfair_idx[0, 0][unfair_valid[0, 0]] < 13).sum()) == 0  # without quotas the defense is wiped out


def test_fair_protected_over_quota_raises():
    positions = torch.arange(20).expand(1, 1, 20)
    valid = torch.ones(1, 1, 20, dtype=torch.bool)
    protected = positions < 4  # 4 sinks in a 5-token span whose quota is floor(10 * 5 / 20) = 2
    with pytest.raises(ValueError, match="span 0"):
        select(torch.rand(1, 1, 20), valid, positions, 10, protected=protected, spans=[(0, 5), (5, 20)])


def test_protected_over_budget_raises():
    scores, valid, positions = make_candidates(0, b=2, h=2, n=20, p_valid=1.0)
    protected = valid & (positions <= positions[:, :, 5:6])
    with pytest.raises(ValueError, match="6 protected keys .* budget=5"):
        select(scores, valid, positions, 5, protected=protected)


def test_rows_within_budget_keep_everything():
    scores, valid, positions = make_candidates(1, b=2, h=3, n=10)
    for mode in ("per_head", "head_adaptive"):
        keep_idx, keep_valid = select(scores, valid, positions, 10, mode=mode)
        for r in range(2):
            for hd in range(3):
                assert keep_idx[r, hd][keep_valid[r, hd]].tolist() == torch.nonzero(valid[r, hd]).flatten().tolist()


def ref_protected(positions, valid, sinks, recent, seen, whitelist):
    b, h, n = positions.shape
    out = torch.zeros_like(valid)
    for r in range(b):
        for hd in range(h):
            real = [j for j in range(n) if valid[r, hd, j]]
            for rank, j in enumerate(real):
                p = int(positions[r, hd, j])
                if rank < sinks or p >= seen - recent or any(s <= p < e for s, e in whitelist):
                    out[r, hd, j] = True
    return out


@pytest.mark.parametrize(("sinks", "recent", "whitelist"), [(0, 0, []), (3, 4, []), (2, 0, [(6, 9), (12, 13)])])
def test_protected_mask_left_padded(sinks, recent, whitelist):
    # rows padded on the left by 0, 3 and 5 columns; in row 2 head 1 some keys were evicted before
    seen = 16
    positions = torch.arange(seen).expand(3, 2, seen).clone()
    valid = positions >= torch.tensor([0, 3, 5])[:, None, None]
    valid[2, 1, 6:9] = False
    positions = positions.masked_fill(~valid & (positions >= 5), -1)
    got = protected_mask(positions, valid, sinks=sinks, recent=recent, seen=seen, whitelist=whitelist)
    assert torch.equal(got, ref_protected(positions, valid, sinks, recent, seen, whitelist))
    if sinks:
        assert bool(got[1, 0, 3]) and not bool(got[1, 0, 0])  # the first real token, not column 0


def test_whitelist_always_kept():
    scores, valid, positions = make_candidates(3, b=2, h=3, n=40)
    whitelist = [(10, 16), (30, 33)]
    protected = protected_mask(positions, valid, sinks=2, recent=3, seen=int(positions.max()) + 1, whitelist=whitelist)
    listed = valid & (((positions >= 10) & (positions < 16)) | ((positions >= 30) & (positions < 33)))
    scores = scores.masked_fill(listed, -1e9)
    for mode in ("per_head", "head_adaptive"):
        keep_idx, keep_valid = select(scores, valid, positions, 16, protected=protected, mode=mode)
        kept = torch.zeros_like(valid)
        for r in range(2):
            for hd in range(3):
                kept[r, hd, keep_idx[r, hd][keep_valid[r, hd]]] = True
        assert bool(listed.any()) and not bool((listed & ~kept).any())


def test_bad_inputs_raise():
    scores, valid, positions = make_candidates(0, b=1, h=2, n=8, p_valid=1.0)
    with pytest.raises(ValueError, match="mode"):
        select(scores, valid, positions, 4, mode="global")
    with pytest.raises(ValueError, match="NaN"):
        select(torch.full_like(scores, float("nan")), valid, positions, 4)
    with pytest.raises(ValueError, match="positions has shape"):
        select(scores, valid, positions[:, :, :4], 4)
    with pytest.raises(ValueError, match="budget"):
        select(scores, valid, positions, -1)
    with pytest.raises(ValueError, match="head_adaptive"):
        select(scores, valid, positions, 4, mode="head_adaptive", spans=[(0, 4)])
    with pytest.raises(ValueError, match="sorted and disjoint"):
        select(scores, valid, positions, 4, spans=[(0, 5), (3, 8)])
    with pytest.raises(ValueError, match="per_layer"):
        select(scores, valid, torch.stack([positions[:, 0], positions[:, 0] + 1], dim=1), 4, mode="per_layer")
    with pytest.raises(ValueError, match="sinks"):
        protected_mask(positions, valid, sinks=-1, recent=0, seen=8)
