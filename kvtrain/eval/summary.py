"""From sweep records to tables: per cell metrics against the full cache, overall scores, training gaps.

A record is one line of `results.jsonl` (`kvtrain.eval.sweep`). The full cache of the base model
(method "full") is the reference of every suite. Cache bytes of a (model, method, budget): the `memory`
suite's fraction of a 16-bit full cache when it ran, else the mean of the fractions the other suites measured.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from kvtrain.eval import metrics as M
from kvtrain.eval.intervals import interval
from kvtrain.eval.suites import SuiteResult, get_suite, kept_where_full_right, quality_ratio, relative_metrics
from kvtrain.eval.suites.base import block_differences
from kvtrain.eval.sweep import FULL

# Metrics measured in time or process memory: they differ run to run, so tables that must be reproducible
# (a resumed sweep against an uninterrupted one) leave them out.
TIMING_MARKERS = ("tok_s", "speed_vs_dynamic", "rss")
# The compression must hold at most this share of the bytes to count as "2x fewer bytes" (a small tolerance
# for the full-precision tokens between compression events).
TWO_X = 0.55


def is_timing(metric: str) -> bool:
    return any(marker in metric for marker in TIMING_MARKERS)


def _key(record: dict[str, Any]) -> tuple[str, str, str, str]:
    return record["model"], record["method"], record["budget"], record["suite"]


def in_grid_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records grouped by model, method, budget and suite, each in order of first appearance: a sweep appends
    cells in grid order, interrupted or not, so this is the grid's order (budgets low, mid, high; not sorted
    by name)."""
    firsts: list[dict[str, int]] = [{}, {}, {}, {}]
    for r in records:
        for seen, value in zip(firsts, _key(r)):
            seen.setdefault(value, len(seen))
    return sorted(records, key=lambda r: tuple(seen[v] for seen, v in zip(firsts, _key(r))))


def _result(record: dict[str, Any]) -> SuiteResult:
    return SuiteResult.from_dict(record["result"])


def full_results(records: list[dict[str, Any]]) -> dict[str, SuiteResult]:
    """Suite -> the base model's full-cache result."""
    return {r["suite"]: _result(r) for r in records if r["model"] == "base" and r["method"] == FULL}


def cache_fractions(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """(model, method, budget) -> bytes held per token seen over a 16-bit full cache's."""
    measured: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    from_memory: dict[tuple[str, str, str], float] = {}
    for r in records:
        metrics = r["result"]["metrics"]
        cell = (r["model"], r["method"], r["budget"])
        if "cache_fraction" not in metrics:
            continue
        if r["suite"] == "memory":
            from_memory[cell] = metrics["cache_fraction"]
        else:
            measured[cell].append(metrics["cache_fraction"])
    out = {cell: M.mean(values, "cache fractions") for cell, values in measured.items()}
    out.update(from_memory)
    return out


def results_table(records: list[dict[str, Any]], *, timings: bool = False) -> list[dict[str, Any]]:
    """One row per record, in grid order: its metrics, and against the full cache the quality ratio and the
    per-check accuracy where the full cache is right. Timing metrics only if asked."""
    full = full_results(records)
    rows = []
    for r in in_grid_order(records):
        result, suite = _result(r), get_suite(r["suite"])
        row: dict[str, Any] = {"model": r["model"], "method": r["method"], "budget": r["budget"],
                               "suite": r["suite"], "skipped": result.skipped or ""}
        row.update({k: v for k, v in sorted(result.metrics.items()) if timings or not is_timing(k)})
        row.update(_score_interval(suite, result))
        reference = full.get(r["suite"])
        if reference is not None and r["method"] != FULL and not result.skipped:
            row["quality_ratio"] = quality_ratio(suite, result, reference)
            row.update(relative_metrics(result, reference))
            row.update(block_differences(result, reference))
        rows.append(row)
    return rows


def _score_interval(suite, result: SuiteResult) -> dict[str, Any]:
    """The 95% interval over items of an item suite's quality checks (Wilson for pass/fail, else bootstrap),
    unless the suite reports its own."""
    name = suite.quality_metric
    scores = [row["scores"][check] for row in result.items if row.get("meta", {}).get("fix", "none") == "none"
              for check in row["scores"] if suite.quality_checks and check.startswith(suite.quality_checks)]
    if not scores or name is None or f"{name}_ci95_low" in result.metrics:
        return {}
    low, high, method = interval(scores)
    return {"quality_checks_mean": M.mean(scores), "quality_checks_ci95_low": low, "quality_checks_ci95_high": high,
            "interval": method}


def overall_scores(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per compressed (model, method, budget): EffiVLM-style overall performance (quadratic mean over the task
    suites of quality / full-cache quality), loyalty (mean agreement of responses with the full cache over
    the item suites), `kept_where_full_right` (mean over the item suites of the quality checks' score on what
    the full cache gets right: unlike a ratio of accuracies, not inflated when a small model's full-cache
    accuracy is low), and the cache fraction; sorted by cache fraction."""
    full = full_results(records)
    fractions = cache_fractions(records)
    ratios: dict[tuple, dict[str, float]] = defaultdict(dict)
    agreements: dict[tuple, list[float]] = defaultdict(list)
    kept: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        suite, result = get_suite(r["suite"]), _result(r)
        if r["method"] == FULL or result.skipped or r["suite"] not in full:
            continue
        cell = (r["model"], r["method"], r["budget"])
        ratio = quality_ratio(suite, result, full[r["suite"]])
        if suite.in_overall and ratio is not None:
            ratios[cell][r["suite"]] = ratio
        if result.items:
            agreements[cell].append(relative_metrics(result, full[r["suite"]])["agreement_with_full"])
            right = kept_where_full_right(suite, result, full[r["suite"]])
            if suite.in_overall and right is not None:
                kept[cell].append(right)
    rows = []
    for cell in sorted(set(ratios) | set(agreements), key=lambda c: (fractions.get(c, 1.0), c)):
        row = {"model": cell[0], "method": cell[1], "budget": cell[2], "cache_fraction": fractions.get(cell)}
        row["overall_performance"] = M.overall_performance(ratios[cell]) if ratios.get(cell) else None
        row["loyalty"] = M.mean(agreements[cell], "agreements") if agreements.get(cell) else None
        row["kept_where_full_right"] = M.mean(kept[cell], "scores") if kept.get(cell) else None
        row.update({f"ratio_{suite}": value for suite, value in sorted(ratios[cell].items())})
        rows.append(row)
    return rows


def training_gaps(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint and suite: quality with the full cache (base model), of the base model and of the trained
    model under the checkpoint's compression, and the fraction of the gap that training closes."""
    full = full_results(records)
    by_key = {_key(r): r for r in records}
    rows = []
    for r in in_grid_order(records):
        if r["model"] == "base" or r["budget"] != "trained":
            continue
        suite = get_suite(r["suite"])
        base = by_key.get(("base", r["method"], "trained", r["suite"]))
        name = suite.quality_metric
        if base is None or r["suite"] not in full or name is None or _result(r).skipped:
            continue
        values = [full[r["suite"]].metrics.get(name), _result(base).metrics.get(name), _result(r).metrics.get(name)]
        if None in values:
            continue
        sign = -1.0 if suite.quality_lower_is_better else 1.0
        closed = M.gap_closed(*(sign * v for v in values))
        rows.append({"checkpoint": r["model"], "suite": r["suite"], "metric": name, "full_cache": values[0],
                     "base_compressed": values[1], "trained_compressed": values[2], "gap_closed": closed})
    return rows


def against_best_two_x(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint and suite: the trained model's quality and cache fraction next to the best training-free
    cell (base model) holding at most about half the bytes of a 16-bit cache (fraction <= TWO_X)."""
    fractions = cache_fractions(records)
    rows = []
    for r in in_grid_order(records):
        if r["model"] == "base" or r["budget"] != "trained" or _result(r).skipped:
            continue
        suite = get_suite(r["suite"])
        name = suite.quality_metric
        if name is None or name not in _result(r).metrics:
            continue
        candidates = [c for c in records if c["model"] == "base" and c["suite"] == r["suite"] and c["method"] != FULL
                      and c["budget"] != "trained" and not _result(c).skipped and name in _result(c).metrics
                      and fractions.get((c["model"], c["method"], c["budget"]), 1.0) <= TWO_X]
        if not candidates:
            continue
        pick = min if suite.quality_lower_is_better else max
        best = pick(candidates, key=lambda c: _result(c).metrics[name])
        rows.append({"checkpoint": r["model"], "suite": r["suite"], "metric": name,
                     "trained": _result(r).metrics[name],
                     "trained_fraction": fractions.get((r["model"], r["method"], r["budget"])),
                     "best_training_free": f"{best['method']}/{best['budget']}",
                     "best_value": _result(best).metrics[name],
                     "best_fraction": fractions.get((best["model"], best["method"], best["budget"]))})
    return rows
