"""`kvtrain eval report`: markdown, CSV and PNG figures from a sweep's `results.jsonl`.

Sections: overall scores (EffiVLM-style overall performance and loyalty) by cache bytes; per suite a Pareto
plot of quality vs cache bytes and its table; per-layer fidelity; instruction following and leakage with and
without the Pitfalls fixes, with keep-rate heatmaps per span; where the bytes go and what it takes to hold
>= 8x fewer bytes; with checkpoints, how much of the full-cache gap training closes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from kvtrain.eval import plots
from kvtrain.eval import summary as S
from kvtrain.eval.cache_bytes import PARTS, reduction_scenarios
from kvtrain.eval.report import markdown_table, provenance_lines
from kvtrain.eval.suites import SuiteResult, get_suite
from kvtrain.eval.sweep import FULL, PROVENANCE, read_results
from kvtrain.io import atomic_write_text


def _label(row: dict[str, Any]) -> str:
    model = "" if row["model"] == "base" else f"[{row['model']}] "
    return f"{model}{row['method']}" + ("" if row["method"] == FULL else f"/{row['budget']}")


def _table(rows: list[dict[str, Any]]) -> str:
    """A markdown table with every column any row has."""
    return markdown_table(rows, list(dict.fromkeys(k for row in rows for k in row)))


def _csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _results_by_suite(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["suite"], []).append(r)
    return out


def _suite_section(suite_name: str, records: list[dict[str, Any]], table: list[dict[str, Any]], fractions,
                   out: Path) -> str:
    suite = get_suite(suite_name)
    rows = [row for row in table if row["suite"] == suite_name]
    text = f"\n### {suite_name}\n\n"
    quality = suite.quality_metric
    points = []
    full_quality = None
    for row in rows:
        if quality is None or quality not in row:
            continue
        if row["method"] == FULL:
            full_quality = row[quality]
            continue
        fraction = fractions.get((row["model"], row["method"], row["budget"]))
        if fraction is not None:
            points.append({"method": _label(row).split("/")[0], "budget": row["budget"], "fraction": fraction,
                           "quality": row[quality]})
    if points:
        png = f"pareto_{suite_name}.png"
        plots.pareto(points, out / png, title=f"{suite_name}: {quality} vs cache bytes", quality=quality,
                     lower_is_better=suite.quality_lower_is_better, full_quality=full_quality)
        text += f"![{suite_name} Pareto front]({png})\n\n"
    shown = [c for c in _suite_columns(suite_name, rows)]
    text += markdown_table([{"cell": _label(r), "cache_fraction": fractions.get((r["model"], r["method"], r["budget"]),
                                                                             1.0 if r["method"] == FULL else None),
                             **{c: r.get(c) for c in shown}} for r in rows], ["cell", "cache_fraction", *shown])
    return text


def _suite_columns(suite_name: str, rows: list[dict[str, Any]]) -> list[str]:
    """The columns worth a reader's eye: quality, relative metrics, and the suite's main breakdowns."""
    wanted = {
        "perplexity": ["perplexity", "kl", "top1_agreement", "quality_ratio"],
        "loyalty": ["perplexity", "kl", "top1_agreement", "quality_ratio"],
        "fidelity": ["logit_error", "output_error", "output_error_worst", "skipped"],
        "retrieval": ["accuracy", "accuracy_passkey", "accuracy_needle", "accuracy_copy", "answer_where_full_right",
                      "agreement_with_full"],
        "instructions": ["instruction_pass_rate", "leak_directive", "leak_defence", "refusal", "keep_defence_all",
                         "keep_directive", "agreement_with_full"],
        "reasoning": ["accuracy", "chain_accuracy", "chain_steps", "word_accuracy", "answer_where_full_right",
                      "agreement_with_full"],
        "memory": ["bytes_per_token", "bytes_codes", "bytes_scales", "bytes_means", "bytes_lowrank_coef",
                   "bytes_residual", "bytes_bookkeeping"],
        "ruler": ["accuracy", "accuracy_ci95_low", "accuracy_ci95_high", "answer_where_full_right",
                  "agreement_with_full"],
    }.get(suite_name, [])
    # intervals over items, and the difference to the full cache paired on the same items (or blocks)
    wanted += ["quality_checks_mean", "quality_checks_ci95_low", "quality_checks_ci95_high", "interval",
               "perplexity_ci95_low", "perplexity_ci95_high", "nll_minus_full", "nll_minus_full_ci95_low",
               "nll_minus_full_ci95_high", "nll_minus_full_real", "answer_minus_full", "answer_minus_full_ci95_low",
               "answer_minus_full_ci95_high", "answer_minus_full_real"]
    present = {k for row in rows for k in row}
    return [c for c in wanted if c in present]


def _fidelity_section(records: list[dict[str, Any]], out: Path) -> str:
    series = {}
    for r in records:
        result = SuiteResult.from_dict(r["result"])
        if r["suite"] == "fidelity" and not result.skipped:
            series[_label(r)] = result.extra["output_error_per_layer"]
    if not series:
        return ""
    plots.per_layer(series, out / "fidelity_layers.png", title="attention output error per layer",
                    ylabel="relative error of the attention output")
    return ("\n### Per-layer fidelity\n\nRelative error of each layer's attention output with the configuration's "
            "stored keys and values (layer inputs exact).\n\n![per-layer fidelity](fidelity_layers.png)\n")


def _instructions_section(records: list[dict[str, Any]], out: Path) -> str:
    cells = [(r, SuiteResult.from_dict(r["result"])) for r in records if r["suite"] == "instructions"]
    rows, labels, per_layer = [], [], {}
    spans = ["template", "defence_all", "defence_key", "directive", "preamble"]
    metric_rows = []
    for r, result in cells:
        for fix, rates in result.extra.get("keep_rates", {}).items():
            if not rates:
                continue
            label = f"{_label(r)}" + ("" if fix == "none" else f" +{fix}")
            labels.append(label)
            rows.append([sum(rates[s]) / len(rates[s]) if rates.get(s) else math.nan for s in spans])
            per_layer.setdefault(fix, (label, rates))
            prefix = "" if fix == "none" else f"{fix}_"
            metric_rows.append({"cell": label, **{m: result.metrics.get(prefix + m) for m in
                                ("instruction_pass_rate", "leak_directive", "leak_defence", "refusal")},
                                "skipped_items": result.extra.get("skipped", {}).get(fix)})
    if not rows:
        return ""
    plots.heatmap(rows, labels, spans, out / "keep_rates.png",
                  title="share of each span's tokens kept after compressing the system prompt")
    text = ("\n### Instructions: keep rates per span, with and without the fixes\n\n![keep rates](keep_rates.png)\n\n"
            + _table(metric_rows))
    layer_png = []
    for fix, (label, rates) in per_layer.items():
        names = [s for s in spans if rates.get(s)]
        matrix = [[rates[s][layer] for layer in range(len(rates[names[0]]))] for s in names]
        png = f"keep_rates_layers_{fix}.png"
        plots.heatmap(matrix, names, [str(i) for i in range(len(matrix[0]))], out / png, annotate=False,
                      title=f"keep rate per layer: {label}", xlabel="layer")
        layer_png.append(f"![keep rates per layer, {fix}]({png})")
    return text + "\n" + "\n".join(layer_png) + "\n"


def _memory_section(records: list[dict[str, Any]], out: Path, model_shape: dict[str, int] | None) -> str:

    cells = [(r, SuiteResult.from_dict(r["result"]).metrics) for r in records if r["suite"] == "memory"]
    text = ""
    if cells:
        bars = {_label(r): {**{p: m.get(f"bytes_{p}", 0.0) for p in PARTS}, "bookkeeping": m.get("bytes_bookkeeping", 0)}
                for r, m in cells}
        full16 = cells[0][1]["bytes_full16"]
        plots.bytes_breakdown(bars, full16, out / "memory_bytes.png", title="where the cache's bytes go")
        speed = [{"cell": _label(r), **{k: v for k, v in m.items() if S.is_timing(k)}} for r, m in cells]
        text += ("\n### Where the bytes go\n\nBytes per token seen, 16-bit equivalent (bookkeeping listed apart, "
                 "not in the fraction).\n\n![bytes](memory_bytes.png)\n\n" + _table(speed))
    if model_shape:
        text += (f"\n#### What it takes to hold >= 8x fewer bytes (arithmetic, {model_shape['kv_heads']} KV heads x "
                 f"{model_shape['head_dim']} dims)\n\n"
                 + _table(reduction_scenarios(model_shape["kv_heads"], model_shape["head_dim"])))
    return text


def write_report(out: str | Path, *, records: list[dict[str, Any]] | None = None, title: str = "kvtrain evaluation",
                 command: str | None = None, model_shape: dict[str, int] | None = None, notes: str = "") -> Path:
    """Write `report.md`, `table.csv`, `overall.csv` and the figures into `out` (a sweep's folder)."""
    out = Path(out)
    records = read_results(out) if records is None else records
    if not records:
        raise ValueError(f"{out}: no results to report (run `kvtrain eval sweep` first)")
    table = S.results_table(records, timings=True)
    overall = S.overall_scores(records)
    fractions = S.cache_fractions(records)
    atomic_write_text(out / "table.csv", _csv(table))
    atomic_write_text(out / "overall.csv", _csv(overall) if overall else "")
    info = json.loads((out / PROVENANCE).read_text()) if (out / PROVENANCE).is_file() else {}
    text = f"# {title}\n\n" + provenance_lines(info)
    if command:
        text += f"- command: `{command}`\n"
    text += f"- cells: {len(records)}; wall time of the cells: {sum(r.get('seconds', 0) for r in records) / 60:.1f} min\n"
    text += notes
    if overall:
        text += ("\n## Overall\n\n`overall_performance`: quadratic mean over the task suites of quality / full-cache "
                 "quality (perplexity: full / compressed), as in EffiVLM-Bench: with a small model a few lucky answers "
                 "push a ratio above 1; `kept_where_full_right`: mean over the item suites of the quality checks' "
                 "score on the items the full cache gets right (1: compression lost nothing); `loyalty`: share of "
                 "answers identical to the full cache's.\n\n" + _table(overall))
    gaps = S.training_gaps(records)
    if gaps:
        text += ("\n## Does training pay off?\n\n`gap_closed` = (trained - base) / (full - base) under the same "
                 "compression (1: training reaches the full cache; 0: no change; negative: worse).\n\n"
                 + _table(gaps) + "\n" + _table(S.against_best_two_x(records)))
    text += ("\n## Suites\n\nIntervals are 95%: over items (Wilson for pass/fail scores, percentile bootstrap "
             "otherwise; column `interval`) or over blocks (perplexity, bootstrap). `<check>_minus_full` is the "
             "difference to the full cache paired on the same items (blocks for `nll`), with its paired-bootstrap "
             "interval; `_real` is 1 only when that interval excludes 0.\n")
    for suite_name in _results_by_suite(records):
        text += _suite_section(suite_name, records, table, fractions, out)
    text += _fidelity_section(records, out)
    text += _instructions_section(records, out)
    text += _memory_section(records, out, model_shape)
    atomic_write_text(out / "report.md", text)
    return out / "report.md"
