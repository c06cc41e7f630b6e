"""Suite-level metrics on hand-made results: keep rates per span, instruction aggregates, comparisons with the
full cache (per check where it is right, agreement, quality ratio), cache fractions of sweep cells."""

from __future__ import annotations

import pytest
import torch

from kvtrain.eval.suites import SuiteResult, get_suite, quality_ratio, relative_metrics
from kvtrain.eval.suites.instructions import _aggregate, _keep_rates
from kvtrain.eval.summary import cache_fractions, overall_scores


def test_keep_rates_by_hand():
    spans = [(0, 2), (2, 6), (6, 8)]  # pieces: template [0, 2), defence [2, 6), directive [6, 8)
    groups = {"template": [0], "defence_all": [1], "directive": [2]}
    # layer 0: head 0 keeps 0,1,2,7; head 1 keeps 0,1,3,4 (-1: an empty slot). Layer 1 is dense (None).
    kept = [torch.tensor([[0, 1, 2, 7], [0, 1, 3, 4]]), None]
    rates = _keep_rates(kept, spans, groups)
    # defence (4 tokens): head 0 keeps 1 -> 0.25, head 1 keeps 2 -> 0.5: mean 0.375; directive: 0.5 and 0
    assert rates == {"template": [1.0], "defence_all": [0.375], "directive": [0.25]}
    assert _keep_rates([torch.tensor([[0, 2, -1, -1]])], spans, groups)["defence_all"] == [0.25]


def test_instruction_aggregates_by_hand():
    class Item:
        def __init__(self, kind):
            self.meta = {"kind": kind}

    task_a = {"scores": {"instruction:lowercase": 1.0, "instruction:no_commas": 0.0}, "keep_rates": {
        "defence_all": [0.2, 0.4], "directive": [1.0, 0.5]}}
    task_b = {"scores": {"instruction:lowercase": 1.0, "instruction:quoted": 1.0}}
    leak = {"scores": {"leak_directive": 0.5, "leak_defence": 0.25, "refusal": 0.0}}
    out = _aggregate([(Item("task"), task_a), (Item("task"), task_b), (Item("leak"), leak)], "fair_")
    assert out == {"fair_instruction_pass_rate": 0.75, "fair_all_instructions_rate": 0.5, "fair_pass_lowercase": 1.0,
                   "fair_pass_no_commas": 0.0, "fair_pass_quoted": 1.0, "fair_leak_directive": 0.5,
                   "fair_leak_defence": 0.25, "fair_refusal": 0.0, "fair_keep_defence_all": pytest.approx(0.3),
                   "fair_keep_directive": 0.75}


def _item(id_, response, **scores):
    return {"id": id_, "response": response, "scores": scores}


def test_relative_metrics_by_hand():
    full = SuiteResult({"accuracy": 0.5}, [_item("a", "x", answer=1.0), _item("b", "y", answer=0.0),
                                            _item("c", "z", answer=1.0)])
    mine = SuiteResult({"accuracy": 2 / 3}, [_item("a", "x", answer=1.0), _item("b", "q", answer=1.0),
                                             _item("c", "w", answer=0.0)])
    # Paired per-item differences 0, +1, -1: mean 0; a percentile bootstrap of 3 items draws all -1 (or all +1)
    # with probability 1/27 > 2.5%, so its 95% interval is [-1, 1], which holds 0: not a real difference.
    assert relative_metrics(mine, full) == {
        "answer_where_full_right": 0.5, "agreement_with_full": pytest.approx(1 / 3), "answer_minus_full": 0.0,
        "answer_minus_full_ci95_low": -1.0, "answer_minus_full_ci95_high": 1.0, "answer_minus_full_real": 0.0}
    fixed = SuiteResult({}, [{**_item("a+fair", "x", answer=0.0), "item": "a", "meta": {"fix": "fair"}}])
    # One item, difference -1: every resample is -1, the interval [-1, -1] excludes 0.
    assert relative_metrics(fixed, full) == {
        "fair_answer_where_full_right": 0.0, "fair_agreement_with_full": 1.0, "fair_answer_minus_full": -1.0,
        "fair_answer_minus_full_ci95_low": -1.0, "fair_answer_minus_full_ci95_high": -1.0,
        "fair_answer_minus_full_real": 1.0}


def test_quality_ratio_inverts_lower_is_better():
    full, mine = SuiteResult({"perplexity": 10.0}), SuiteResult({"perplexity": 12.5})
    assert quality_ratio(get_suite("perplexity"), mine, full) == 0.8  # full / compressed
    assert quality_ratio(get_suite("retrieval"), SuiteResult({"accuracy": 0.3}), SuiteResult({"accuracy": 0.6})) == 0.5
    assert quality_ratio(get_suite("memory"), mine, full) is None


def test_a_nan_metric_is_an_error():
    with pytest.raises(ValueError, match="metric 'accuracy' is nan"):
        SuiteResult({"accuracy": float("nan")})


def _record(method, budget, suite, metrics, items=()):
    return {"model": "base", "method": method, "budget": budget, "suite": suite,
            "result": SuiteResult(metrics, list(items)).to_dict()}


def test_cache_fractions_and_overall_scores_by_hand():
    records = [
        _record("full", "-", "retrieval", {"accuracy": 0.5, "cache_fraction": 1.0}, [_item("a", "x", answer=1.0)]),
        _record("full", "-", "perplexity", {"perplexity": 10.0}),
        _record("m", "low", "retrieval", {"accuracy": 0.3, "cache_fraction": 0.4}, [_item("a", "y", answer=0.0)]),
        _record("m", "low", "reasoning", {"accuracy": 0.0, "cache_fraction": 0.6}),
        _record("m", "low", "perplexity", {"perplexity": 12.5}),
    ]
    assert cache_fractions(records)[("base", "m", "low")] == pytest.approx(0.5)  # mean of what suites measured
    with_memory = records + [_record("m", "low", "memory", {"cache_fraction": 0.45})]
    assert cache_fractions(with_memory)[("base", "m", "low")] == 0.45  # the memory suite's measurement wins
    (row,) = overall_scores(records)
    # ratios: retrieval 0.3/0.5 = 0.6, perplexity 10/12.5 = 0.8 (reasoning has no full-cache run: left out)
    assert row["overall_performance"] == pytest.approx(0.5 ** 0.5) and row["loyalty"] == 0.0
    assert row["ratio_retrieval"] == pytest.approx(0.6) and row["ratio_perplexity"] == 0.8
