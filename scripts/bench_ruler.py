"""RULER-shaped benchmark: SmolLM2's full cache and training-free methods on `kvtrain eval ruler`.

A sweep (resumable: rerun the same command after a kill) into benchmarks/ruler/<setting>/: the full cache is
run once per setting and is the reference of every method. Then `results.md` beside it: per (task, length)
accuracy with its 95% Wilson interval, the full cache's accuracy, the paired difference to the full cache,
and the sweep's report (Pareto plot of accuracy vs cache bytes, tables, wall time).

    python scripts/bench_ruler.py --n 100 --lengths 1024 2048 --question after \\
        --methods snapkv expected_attention tova gkv snapkv+keepkv snapkv+tada4 --budgets low mid high
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from kvtrain.eval.intervals import paired_difference
from kvtrain.eval.report import markdown_table
from kvtrain.eval.suites.ruler import headline, task_table
from kvtrain.eval.suites import SuiteResult
from kvtrain.eval.sweep import FULL, run_sweep
from kvtrain.eval.sweep_report import write_report
from kvtrain.io import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024])
    parser.add_argument("--question", choices=["after", "inside"], default="after")
    parser.add_argument("--methods", nargs="+", default=["snapkv"])
    parser.add_argument("--budgets", nargs="+", default=["mid", "high"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/ruler"))
    args = parser.parse_args()
    out = args.out / args.question
    out.mkdir(parents=True, exist_ok=True)
    grid = {"model": "smollm2-135m", "budgets": args.budgets, "methods": args.methods,
            "suites": {"ruler": {"n": args.n, "lengths": args.lengths, "question": args.question}}}
    atomic_write_text(out / "grid.yaml", yaml.safe_dump(grid, sort_keys=False))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    records = run_sweep(out / "grid.yaml", out)
    command = "python " + " ".join(sys.argv)
    full = next(SuiteResult.from_dict(r["result"]) for r in records if r["method"] == FULL)
    full_scores = {row["id"]: row["scores"]["answer"] for row in full.items}
    notes = (f"- load when this session started (2 cores shared with other jobs, timings contended): `{load}`\n"
             f"- question setting: `{args.question}`; n = {args.n} per (task, length); lengths {args.lengths}\n"
             "- intervals: 95% Wilson per task; differences to the full cache: paired bootstrap over the same items, "
             "*real* when the interval excludes 0; tasks whose full-cache accuracy is below 0.3 are diagnostic "
             "(outside the headline mean)\n")
    sections, rows_csv = [], []
    for r in records:
        result = SuiteResult.from_dict(r["result"])
        reference = None if r["method"] == FULL else full
        table = task_table(result, reference if reference is not None else full)
        label = r["method"] if r["method"] == FULL else f"{r['method']}/{r['budget']}"
        scores = [row["scores"]["answer"] for row in result.items]
        diff = paired_difference(scores, [full_scores[row["id"]] for row in result.items])
        sections.append(f"\n### {label} (cache fraction {result.metrics['cache_fraction']:.3f}, "
                        f"{r['seconds'] / 60:.1f} min)\n\nheadline mean (non-diagnostic tasks): "
                        f"{headline(table):.3f}; all items: {result.metrics['accuracy']:.3f} "
                        f"[{result.metrics['accuracy_ci95_low']:.3f}, {result.metrics['accuracy_ci95_high']:.3f}]; "
                        f"minus full cache: {diff['difference']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"
                        f"{' (real)' if diff['real'] else ''}\n\n" + markdown_table(table))
        rows_csv += [{"cell": label, "cache_fraction": result.metrics["cache_fraction"], **row} for row in table]
    write_report(out, records=records, title=f"RULER-shaped suite, question {args.question}", command=command,
                 notes=notes)
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for row in rows_csv for k in row)))
    writer.writeheader()
    writer.writerows(rows_csv)
    atomic_write_text(out / "tasks.csv", buffer.getvalue())
    info = json.loads((out / "provenance.json").read_text())
    atomic_write_text(out / "results.md", f"# RULER-shaped suite, question {args.question}\n\n"
                      + "".join(f"- {k}: {v}\n" for k, v in info.items()) + f"- command: `{command}`\n" + notes
                      + "\nPareto plot and the sweep's tables: [report.md](report.md)\n" + "".join(sections))
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
