"""Benchmark: every evaluation suite on SmolLM2 for six methods x three budgets, and the report.

    python scripts/bench_eval.py              # the committed run: benchmarks/eval/ (calibrates first if needed)
    python scripts/bench_eval.py --resume     # continue a killed run where it stopped

Calibrates KQ-SVD projections at rank 32 into `runs/eval/calib` if they are not there (`kvtrain calibrate --fit
kqsvd --rank 32 --value-rank 32`, so ranks 32/16/8 can all be cut from them), runs the sweep of
`benchmarks/eval/grid.yaml` into `benchmarks/eval/` (results.jsonl, resumable), then writes `report.md`,
`table.csv`, `overall.csv` and the figures there, with machine, date and commit.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "benchmarks" / "eval" / "grid.yaml"
OUT = REPO / "benchmarks" / "eval"
CALIB = REPO / "runs" / "eval" / "calib"
COMMAND = "python scripts/bench_eval.py"


def ensure_calibration(model_name: str, folder: Path) -> None:
    from kvtrain import load_model
    from kvtrain.calibrate.run import calibrate

    if (folder / "kv_compression" / "projections.safetensors").is_file():
        return
    print(f"[bench_eval] calibrating KQ-SVD projections (rank 32) into {folder}", file=sys.stderr)
    model, tokenizer = load_model(model_name)
    calibrate(model, tokenizer, out_dir=folder, fit=["kqsvd"], rank=32, value_rank=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=GRID)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--calib", type=Path, default=CALIB, help="the grid's `artifacts` folder")
    parser.add_argument("--resume", action="store_true", help="keep the cells already in OUT/results.jsonl")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one is faster on a shared 2-core machine: decode steps are small ops)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import yaml
    from transformers import AutoConfig

    from kvtrain.eval.sweep import PROVENANCE, RESULTS, run_sweep
    from kvtrain.eval.sweep_report import write_report
    from kvtrain.models import head_dim

    grid = yaml.safe_load(args.grid.read_text())
    if Path(grid["artifacts"]).resolve() != args.calib.resolve():
        sys.exit(f"{args.grid}: artifacts {grid['artifacts']!r} is not the calibration folder {args.calib}")
    if not args.resume:
        for name in (RESULTS, PROVENANCE):
            (args.out / name).unlink(missing_ok=True)
    load_before = os.getloadavg()[1]  # other jobs on the machine: timings scale with them
    start = time.perf_counter()
    ensure_calibration(grid["model"], args.calib)
    calibration_s = time.perf_counter() - start
    records = run_sweep(args.grid, args.out)
    total_s = time.perf_counter() - start

    from kvtrain.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(grid["model"]))
    shape = {"kv_heads": config.num_key_value_heads, "head_dim": head_dim(config)}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    notes = (f"- threads: {args.threads}; calibration {calibration_s / 60:.1f} min; whole run "
             f"{total_s / 60:.1f} min{' (resumed)' if args.resume else ''}, of which the process had the CPU for "
             f"{(usage.ru_utime + usage.ru_stime) / 60:.1f} min; 5-minute load average {load_before:.1f} at the "
             f"start, {os.getloadavg()[1]:.1f} at the end ({os.cpu_count()} CPUs)\n"
             f"- grid: `{args.grid.relative_to(REPO) if args.grid.is_relative_to(REPO) else args.grid}`; "
             "interpretation: `README.md` next to this report\n")
    report = write_report(args.out, records=records, title="Evaluation suites on SmolLM2-135M-Instruct",
                          command=COMMAND, model_shape=shape, notes=notes)
    print(f"wrote {report} ({total_s / 60:.1f} min)")


if __name__ == "__main__":
    main()
