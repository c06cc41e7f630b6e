"""Head behaviour statistics against eager attention weights and explicit loops; budget arithmetic."""

from __future__ import annotations

import math
import random

import pytest
import torch

from kvtrain.calibrate.head_budgets import budgets_from_scores, head_budgets
from kvtrain.calibrate.statistics import collect_statistics
from kvtrain.models import tiny_model


def reference_behaviour(attn: torch.Tensor, ids: list[int], stride: int) -> tuple[list[float], list[float], int]:
    """Copy score and normalised entropy (queries t = stride, 2 stride, ...) per head from attention weights
    ``[h, S, S]``, by explicit loops."""
    heads, s, _ = attn.shape
    copy, spread, events = [0.0] * heads, [0.0] * heads, 0
    for t in range(s - 1):
        sources = [j for j in range(1, t + 1) if ids[j - 1] == ids[t] and ids[j] == ids[t + 1]]
        if sources:
            events += 1
            for h in range(heads):
                copy[h] += sum(float(attn[h, t, j]) for j in sources)
    sampled = range(stride, s, stride)
    for h in range(heads):
        for t in sampled:
            entropy = -sum(float(p) * math.log(float(p)) for p in attn[h, t, : t + 1] if p > 0)
            spread[h] += entropy / math.log(t + 1)
    return [c / events for c in copy], [x / len(sampled) for x in spread], events


@pytest.mark.parametrize("stride", [1, 3])
def test_copy_and_spread_match_eager_attention_weights(stride):
    gen = torch.Generator().manual_seed(0)
    motif = torch.randint(4, 40, (12,), generator=gen)
    ids = torch.cat([motif, torch.randint(4, 40, (5,), generator=gen), motif, motif[:6]])  # repeats: copy events
    eager = tiny_model(attn_implementation="eager")
    with torch.no_grad():
        attentions = eager(input_ids=ids[None], output_attentions=True).attentions
    stats = collect_statistics(tiny_model(), ids[None], ("head_behaviour",), entropy_stride=stride)
    copy, spread, events = stats.head_behaviour()
    for layer, attn in enumerate(attentions):
        ref_copy, ref_spread, ref_events = reference_behaviour(attn[0].double(), ids.tolist(), stride)
        assert ref_events > 10 and events[layer] == ref_events
        torch.testing.assert_close(copy[layer], torch.tensor(ref_copy, dtype=torch.float64), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(spread[layer], torch.tensor(ref_spread, dtype=torch.float64), rtol=1e-4, atol=1e-6)


def test_budgets_worked_example():
    # floor = 25, rest = 4 * 100 - 4 * 25 = 300 shared 1:0:0:3 -> 75, 0, 0, 225.
    assert budgets_from_scores([1.0, 0.0, 0.0, 3.0], 100, 0.25) == [100, 25, 25, 250]
    assert budgets_from_scores([0.0, 0.0, 0.0], 10, 0.5) == [10, 10, 10]  # no signal: uniform


@pytest.mark.parametrize("seed", range(5))
def test_budgets_keep_the_total_and_the_floor_and_the_order(seed):
    rng = random.Random(seed)
    scores = [rng.random() for _ in range(rng.randint(1, 12))]
    budget, floor = rng.randint(4, 300), rng.choice([0.0, 0.1, 0.5, 1.0])
    out = budgets_from_scores(scores, budget, floor)
    assert sum(out) == len(scores) * budget
    assert min(out) >= max(1, math.ceil(floor * budget))
    raw = [max(1, math.ceil(floor * budget)) + (len(scores) * budget - len(scores) * max(1, math.ceil(floor * budget)))
           * s / sum(scores) for s in scores]
    assert all(abs(o - r) < 1 for o, r in zip(out, raw))  # largest-remainder rounding moves each by < 1


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="budget=0"):
        budgets_from_scores([1.0], 0, 0.2)
    with pytest.raises(ValueError, match="floor_fraction=1.5"):
        budgets_from_scores([1.0], 8, 1.5)
    with pytest.raises(ValueError, match="beta=2"):
        head_budgets(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), 8, 0.2, 2)
