"""Intervals: Wilson against its closed form, the paired-bootstrap difference against a slow reference."""

from __future__ import annotations

import math
import random

import pytest

from kvtrain.eval.intervals import Z95, bootstrap_mean, interval, paired_difference, wilson
from kvtrain.eval.metrics import NonFiniteMetricError


def test_wilson_matches_the_closed_form():
    # 0 of n: the upper end is z^2 / (n + z^2) (the only root of the Wilson equation above 0)
    assert wilson(0, 10) == (pytest.approx(0.0), pytest.approx(Z95**2 / (10 + Z95**2)))
    assert wilson(10, 10) == (pytest.approx(10 / (10 + Z95**2)), pytest.approx(1.0))
    # 8 of 10 from the textbook: 0.4902 to 0.9433; both ends solve |p - x| = z sqrt(x (1 - x) / n)
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    for x in (low, high):
        assert abs(0.8 - x) == pytest.approx(Z95 * math.sqrt(x * (1 - x) / 10))
    assert interval([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])[:2] == (low, high)
    assert interval([0.5, 1.0, 0.0])[2] == "bootstrap"


def _slow_bootstrap(diffs, samples, seed):
    """Index by index, with the same random stream as `random.choices` (floor(random() * n))."""
    rng = random.Random(seed)
    means = sorted(sum(diffs[math.floor(rng.random() * len(diffs))] for _ in diffs) / len(diffs)
                   for _ in range(samples))
    return means[round(0.025 * (samples - 1))], means[round(0.975 * (samples - 1))]


def test_paired_difference_matches_a_slow_reference_and_pairs_the_items():
    rng = random.Random(1)
    hard = [rng.random() for _ in range(60)]  # item difficulty shared by both arms
    a = [float(h > 0.3) for h in hard]
    b = [float(h > 0.45) for h in hard]  # b fails every item a fails, and a few more
    got = paired_difference(a, b, samples=500, seed=7)
    low, high = _slow_bootstrap([x - y for x, y in zip(a, b)], 500, 7)
    assert (got["low"], got["high"]) == (low, high)
    assert got["difference"] == pytest.approx(sum(a) / 60 - sum(b) / 60)
    assert got["real"] == (low > 0)
    # unpaired, the two arms' intervals overlap; paired, the difference is real (it never goes negative)
    assert wilson(int(sum(a)), 60)[0] < wilson(int(sum(b)), 60)[1] and got["low"] > 0 and got["real"]
    same = paired_difference(a, a)
    assert same["difference"] == same["low"] == same["high"] == 0.0 and not same["real"]


def test_non_finite_scores_are_refused():
    with pytest.raises(NonFiniteMetricError):
        bootstrap_mean([0.5, math.nan])
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0])


def _result(scores):
    from kvtrain.eval.suites import SuiteResult

    return SuiteResult(items=[{"id": str(i), "response": str(s), "scores": {"answer": s}} for i, s in enumerate(scores)])


def test_report_marks_a_difference_real_only_when_its_interval_excludes_zero():
    from kvtrain.eval.suites import relative_metrics

    full = _result([1.0] * 40)
    lost = relative_metrics(_result([0.0] * 30 + [1.0] * 10), full)
    assert lost["answer_minus_full"] == -0.75 and lost["answer_minus_full_ci95_high"] < 0
    assert lost["answer_minus_full_real"] == 1.0
    one = relative_metrics(_result([0.0] + [1.0] * 39), full)  # one item lost of 40: noise
    assert one["answer_minus_full_ci95_low"] < 0 <= one["answer_minus_full_ci95_high"]
    assert one["answer_minus_full_real"] == 0.0


def test_perplexity_per_block_equals_all_blocks_at_once(tiny):
    from kvtrain.eval.loyalty import evaluate_loyalty
    from kvtrain.eval.suites import get_suite
    from kvtrain.eval.suites.perplexity import heldout_blocks
    from tests.eval.conftest import evict_config

    model, tokenizer = tiny
    suite = get_suite("perplexity")
    options = suite.parse_options({"blocks": 3, "context_len": 40, "continuation_len": 8})
    result = suite.run(model, tokenizer, evict_config(), options)
    blocks = heldout_blocks(tokenizer, 3, 48)
    (whole,) = evaluate_loyalty(model, [evict_config()], blocks, context_len=40, method="replay", progress=False)
    assert math.log(result.metrics["perplexity"]) == pytest.approx(whole.nll_compressed, rel=1e-5)
    assert result.metrics["kl"] == pytest.approx(whole.kl_full_to_compressed, rel=1e-4, abs=1e-7)
    assert result.metrics["perplexity_ci95_low"] <= result.metrics["perplexity"] <= result.metrics["perplexity_ci95_high"]
    assert result.metrics["scored_tokens"] == 24
    full = suite.run(model, tokenizer, None, options)
    assert math.log(full.metrics["perplexity"]) == pytest.approx(whole.nll_full, rel=1e-5)
