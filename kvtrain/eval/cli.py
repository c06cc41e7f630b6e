"""`kvtrain eval` sub-commands: one suite, a sweep, its report, item export and scoring, lm-eval.

`add_eval_parsers(subparsers)` adds them to the `kvtrain eval` sub-parsers (next to `loyalty` and `fidelity`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Suites with a command of their own here (loyalty and fidelity have theirs in kvtrain.cli).
SUITE_COMMANDS = ("perplexity", "retrieval", "instructions", "reasoning", "memory", "ruler")


def _compression_given(args: argparse.Namespace) -> bool:
    from kvtrain.arguments import KVCompressionArguments

    kv = KVCompressionArguments.from_namespace(args)
    return any(getattr(kv, name) not in (None, False, []) for name in vars(kv))


def cmd_suite(args: argparse.Namespace) -> None:
    from kvtrain.arguments import KVCompressionArguments, parse_key_values
    from kvtrain.eval.loading import check_suite_limits, load_for_eval
    from kvtrain.eval.report import print_table
    from kvtrain.eval.suites import get_suite, quality_ratio, relative_metrics
    from kvtrain.io import atomic_write_text

    suite = get_suite(args.suite)
    options = suite.parse_options(parse_key_values(args.set, "--set"), "--set")
    requested = KVCompressionArguments.from_namespace(args).to_config()  # checked before anything loads
    check_suite_limits(suite, options, args.model, "--set")
    model, tokenizer, trained_config = load_for_eval(args.model)
    # A checkpoint is evaluated under the compression it was trained for, unless flags say otherwise.
    config = trained_config if trained_config is not None and not _compression_given(args) else requested
    result = suite.run(model, tokenizer, config, options, progress=True)
    rows = [{"cache": "compressed", **result.metrics}]
    output = {"model": args.model, "suite": args.suite, "config": config.to_dict(), "options": vars(options),
              "result": result.to_dict()}
    full = None
    if args.reference:
        full = suite.run(model, tokenizer, None, options, progress=True)
        rows.insert(0, {"cache": "full", **full.metrics})
        relative = {**relative_metrics(result, full), "quality_ratio": quality_ratio(suite, result, full)}
        rows.append({"cache": "compressed vs full", **relative})
        output.update(full=full.to_dict(), relative=relative)
    if result.skipped:
        print(f"[kvtrain] {args.suite}: skipped for this configuration: {result.skipped}", file=sys.stderr)
    print_table(rows, title=f"{args.suite} ({args.model})")
    breakdown = suite.breakdown(result, full)
    if breakdown:
        print_table(breakdown, title=f"{args.suite}: per task (95% Wilson intervals)")
        output["breakdown"] = breakdown
    if args.out:
        atomic_write_text(args.out, json.dumps(output, indent=2, default=str))
        print(f"wrote {args.out}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from kvtrain.eval.sweep import run_sweep
    from kvtrain.eval.sweep_report import write_report

    records = run_sweep(args.grid, args.out)
    if args.report:
        print(f"wrote {write_report(args.out, records=records, command=' '.join(['kvtrain', *sys.argv[1:]]))}")


def cmd_report(args: argparse.Namespace) -> None:
    from kvtrain.eval.sweep_report import write_report

    print(f"wrote {write_report(args.folder, title=args.title)}")


def cmd_export(args: argparse.Namespace) -> None:
    from kvtrain.arguments import parse_key_values
    from kvtrain.eval.items import write_items
    from kvtrain.eval.suites import get_suite
    from kvtrain.models import load_model

    suite = get_suite(args.suite)
    options = suite.parse_options(parse_key_values(args.set, "--set"), "--set")
    _, tokenizer = load_model(args.model)  # prompts are built in the model's chat template and token lengths
    items = suite.build_items(tokenizer, options)
    write_items(args.out, items)
    print(f"wrote {len(items)} {args.suite} items to {args.out}")


def cmd_score(args: argparse.Namespace) -> None:
    from kvtrain.config import ConfigError
    from kvtrain.eval.items import read_items, read_jsonl, score_responses
    from kvtrain.eval.report import print_table
    from kvtrain.io import atomic_write_text

    items = read_items(args.items)
    responses = {}
    for i, record in enumerate(read_jsonl(args.responses), start=1):
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not isinstance(record.get("response"), str):
            raise ConfigError(f"{args.responses}:{i}: expected an object with string fields 'id' and 'response'")
        responses[record["id"]] = record["response"]
    rows = score_responses(items, responses)
    checks = sorted({k for row in rows for k in row if k != "id"})
    means = {c: sum(row[c] for row in rows if c in row) / sum(c in row for row in rows) for c in checks}
    print_table([means], title=f"mean scores over {len(rows)} items")
    if args.out:
        atomic_write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {args.out}")


def cmd_lm_eval(args: argparse.Namespace) -> None:
    from kvtrain.eval.lm_eval_adapter import run_lm_eval_cli

    run_lm_eval_cli(args.lm_eval_args)


def add_eval_parsers(subparsers) -> None:
    """Add the suite commands, `sweep`, `report`, `export`, `score` and `lm-eval` to `kvtrain eval`."""
    from kvtrain.arguments import KVCompressionArguments
    from kvtrain.eval.suites import SUITE_NAMES, get_suite

    for name in SUITE_COMMANDS:
        p = subparsers.add_parser(name, help=f"the {name} suite under a compressed cache (and the full cache)")
        p.add_argument("--model", default="smollm2-135m",
                       help="embedded name, local path, Hub id, or a kvtrain checkpoint folder (evaluated under "
                            "its own kv_compression/ unless compression flags are given)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a suite option (JSON value), repeatable, e.g. --set lengths=[256,512]")
        p.add_argument("--no-reference", dest="reference", action="store_false",
                       help="do not also run the full cache (no accuracy-where-full-is-right, no agreement)")
        p.add_argument("--out", type=Path, help="write the results as JSON")
        KVCompressionArguments.add_to_parser(p)
        p.set_defaults(func=cmd_suite, suite=name)

    p = subparsers.add_parser("sweep", help="every suite x method x budget of a YAML grid; resumable")
    p.add_argument("grid", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder: results.jsonl, then the report")
    p.add_argument("--no-report", dest="report", action="store_false")
    p.set_defaults(func=cmd_sweep)

    p = subparsers.add_parser("report", help="markdown, CSV and plots from a sweep folder")
    p.add_argument("folder", type=Path)
    p.add_argument("--title", default="kvtrain evaluation")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("export", help="a suite's items as JSONL (prompt, checks) for other systems")
    p.add_argument("suite", choices=[name for name in SUITE_NAMES if get_suite(name).has_items])
    p.add_argument("--model", default="smollm2-135m", help="whose tokenizer and chat template build the prompts")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("score", help="score responses to exported items with kvtrain's checkers")
    p.add_argument("--items", type=Path, required=True)
    p.add_argument("--responses", type=Path, required=True, help='JSONL of {"id": ..., "response": ...}')
    p.add_argument("--out", type=Path, help="per-item scores as JSONL")
    p.set_defaults(func=cmd_score)

    p = subparsers.add_parser("lm-eval", help="run lm-evaluation-harness with the `kvtrain` model type registered",
                              description="Everything after `lm-eval` goes to lm-eval's own command line, e.g. "
                              "kvtrain eval lm-eval run --model kvtrain --model_args pretrained=smollm2-135m,"
                              "kv_config=c.yaml --tasks hellaswag")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
