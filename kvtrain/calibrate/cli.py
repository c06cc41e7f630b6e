"""``kvtrain calibrate``: the argparse sub-command (`kvtrain.cli` adds it with `add_calibrate_parser`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from kvtrain.io import check_writable, owned_folder

# Listed by `kvtrain --help` without importing the calibration machinery.
CALIBRATE_HELP = "fit KQ-SVD projections, query statistics, head budgets, a TaDA bit plan, a SALS basis"


def _fit_list(text: str) -> list[str]:
    from kvtrain.calibrate.run import FITS

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(FITS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--fit {text!r}: choose a comma-separated subset of {','.join(FITS)}")
    return names


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``calibrate`` to ``subparsers`` (from `argparse.ArgumentParser.add_subparsers`)."""
    from kvtrain.artifacts.projections import METHODS
    from kvtrain.calibrate.run import DEFAULT_FITS, FITS, CalibrationSettings

    defaults = CalibrationSettings()
    p = subparsers.add_parser(
        "calibrate", help=CALIBRATE_HELP,
        description="Writes OUT/kv_compression/{config.json, projections.safetensors, query_stats.safetensors, "
        "head_budgets.json, quant_plan.json, sals_basis.safetensors (--fit sals)}; an interrupted run resumes "
        "from its last checkpoint.",
    )
    p.add_argument("--model", default="smollm2-135m", help="embedded name, Hub id or local path")
    p.add_argument("--data", default=None, help="'embedded' (default), a .txt/.jsonl file or a datasets name")
    p.add_argument("--split", default="train")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fit", type=_fit_list, default=list(DEFAULT_FITS),
                   help=f"comma-separated subset of {','.join(FITS)} (default {','.join(DEFAULT_FITS)})")
    p.add_argument("--method", choices=METHODS, default=defaults.method)
    p.add_argument("--num-blocks", type=int, default=defaults.num_blocks)
    p.add_argument("--block-len", type=int, default=defaults.block_len)
    p.add_argument("--rank", type=int, help="one key rank for every layer")
    p.add_argument("--rank-budget", type=int, help="total key rank over layers (global allocator)")
    p.add_argument("--energy-eps", type=float, default=defaults.energy_eps,
                   help="per-layer rank: tail energy <= eps^2 (used when no rank/budget is given)")
    p.add_argument("--value-rank", type=int)
    p.add_argument("--value-rank-budget", type=int)
    p.add_argument("--n-sink", type=int, default=defaults.n_sink)
    p.add_argument("--head-budget", type=int, default=defaults.head_budget, help="mean tokens per layer")
    p.add_argument("--head-floor", type=float, default=defaults.head_floor)
    p.add_argument("--head-beta", type=float, default=defaults.head_beta)
    p.add_argument("--head-entropy-stride", type=int, default=defaults.head_entropy_stride)
    p.add_argument("--tada-budget", type=float, default=defaults.tada_budget, help="average bits over layers")
    p.add_argument("--tada-blocks", type=int, default=defaults.tada_blocks)
    p.add_argument("--tada-group-size", type=int, default=defaults.tada_group_size)
    p.add_argument("--tada-residual-length", type=int, default=defaults.tada_residual_length)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--no-resume", dest="resume", action="store_false", help="discard an earlier checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_calibrate)
    return p


def cmd_calibrate(args: argparse.Namespace) -> None:
    from kvtrain.calibrate.run import CalibrationSettings, calibrate
    from kvtrain.models import load_model
    from kvtrain.models.loading import load_config

    check_writable(args.out, "--out", folder=True)
    settings = CalibrationSettings(**{f.name: getattr(args, f.name) for f in fields(CalibrationSettings)})
    settings.check_model(load_config(args.model)[1], tuple(args.fit))
    with owned_folder(args.out, " ".join(["kvtrain", *sys.argv[1:]])) as warnings:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        model, tokenizer = load_model(args.model)
        folder = calibrate(model, tokenizer, out_dir=args.out, data=args.data, split=args.split, fit=args.fit,
                           settings=settings, resume=args.resume, progress=args.progress)
    print(f"wrote {folder}")
