"""`kvtrain` command line: prepare-model, generate, quickstart, calibrate, eval (loyalty, fidelity), publish.

Every command runs under the error boundary (`kvtrain.errors`): a user error is one line naming the file, field
or value, with no stack trace unless ``--debug`` (anywhere on the line) or ``KVTRAIN_DEBUG=1``. Commands import
their machinery when they run, so that ``kvtrain --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvtrain.arguments import KVCompressionArguments, positive_int
from kvtrain.errors import UserError, debug_requested, run_entry_point, said_once
from kvtrain.io import check_writable, owned_folder

if TYPE_CHECKING:
    from kvtrain.config import KVCompressionConfig

DEFAULT_MODEL = "smollm2-135m"
QUICKSTART_HELP = "prepare-model -> calibrate -> distill -> loyalty before/after, on SmolLM2"
EVAL_HELP = "evaluation suites"


def compression_config(args: argparse.Namespace) -> KVCompressionConfig:
    return KVCompressionArguments.from_namespace(args).to_config()


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from kvtrain.models import prepare_model

    print(prepare_model(args.name, force=args.force))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from kvtrain.eval.loyalty import full_cache_bytes_per_token
    from kvtrain.models import load_model
    from kvtrain.models.limits import check_sequence
    from kvtrain.models.loading import load_config
    from kvtrain.runtime.cache import CompressedCache
    from kvtrain.runtime.compressor import bind_config

    if not args.prompt.strip():
        raise UserError("--prompt is empty: give the text to continue")
    config = compression_config(args)
    model_config = load_config(args.model)[1]
    check_sequence(model_config, args.max_new_tokens, "--max-new-tokens (before the prompt)")
    bind_config(config, model_config)
    model, tokenizer = load_model(args.model)
    if args.chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt")
    check_sequence(model.config, inputs["input_ids"].shape[1] + args.max_new_tokens, "prompt + --max-new-tokens")
    cache = CompressedCache.for_model(model, config)
    with torch.no_grad():
        out = model.generate(
            **inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    seen = cache.get_seq_length()
    kept = torch.stack([n.float().mean() for n in cache.stored_tokens()])
    full = full_cache_bytes_per_token(model) * seen
    print(
        f"\n[kvtrain] tokens seen {seen}; kept per KV head: mean {kept.mean():.1f} (min {kept.min():.0f}, "
        f"max {kept.max():.0f}); cache {cache.nbytes() / 2**20:.2f} MiB vs full {full / 2**20:.2f} MiB "
        f"({cache.nbytes() / full:.1%})",
        file=sys.stderr,
    )


def cmd_eval_loyalty(args: argparse.Namespace) -> None:
    from kvtrain.data import load_texts, token_blocks
    from kvtrain.eval.loyalty import evaluate_loyalty
    from kvtrain.eval.report import print_table
    from kvtrain.io import atomic_write_text
    from kvtrain.models import load_model
    from kvtrain.models.limits import check_sequence
    from kvtrain.models.loading import load_config
    from kvtrain.runtime.compressor import bind_config

    if args.out:
        check_writable(args.out, "--out", folder=False)
    config = compression_config(args)
    model_config = load_config(args.model)[1]
    check_sequence(model_config, args.context_len + args.continuation_len, "--context-len + --continuation-len")
    bind_config(config, model_config)
    texts = load_texts(args.data, split=args.split)
    model, tokenizer = load_model(args.model)
    blocks = token_blocks(tokenizer, texts, args.context_len + args.continuation_len, n_blocks=args.samples)
    (result,) = evaluate_loyalty(model, [config], blocks, context_len=args.context_len)
    row = {"model": args.model, "scorer": config.scorer.name, "budget": config.budget, "ratio": config.compression_ratio, **result.to_dict()}
    print_table([row], title="loyalty (continuation tokens, vs the full cache)")
    if args.out:
        atomic_write_text(args.out, json.dumps({"config": config.to_dict(), "result": row}, indent=2))
        print(f"wrote {args.out}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from kvtrain.quickstart import QuickstartSettings, run_quickstart

    check_writable(args.out, "--out", folder=True)
    with owned_folder(args.out, " ".join(["kvtrain", *sys.argv[1:]])) as warnings:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        run_quickstart(QuickstartSettings(out=args.out, steps=args.steps, eval_blocks=args.eval_blocks))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `kvtrain` parser. The heavy commands (quickstart, calibrate, eval) get their arguments only when
    `command` names them; otherwise they are listed by name and help, so that `kvtrain --help` imports none of
    their machinery (torch, transformers) and answers at once."""
    from kvtrain.calibrate.cli import CALIBRATE_HELP, add_calibrate_parser
    from kvtrain.hub.cli import add_publish_parser

    parser = argparse.ArgumentParser(prog="kvtrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the stack trace of an error (or KVTRAIN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert an embedded model (SmolLM2) to a local checkpoint once")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("generate", help="generate under a compressed cache; prints kept tokens and cache bytes")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, Hub id or local path")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    KVCompressionArguments.add_to_parser(p)
    p.set_defaults(func=cmd_generate)

    deferred = {
        "quickstart": (QUICKSTART_HELP, _add_quickstart),
        "calibrate": (CALIBRATE_HELP, add_calibrate_parser),
        "eval": (EVAL_HELP, _add_eval),
    }
    for name, (help_text, add) in deferred.items():
        if command == name:
            add(sub)
        else:
            sub.add_parser(name, help=help_text)
    add_publish_parser(sub)
    return parser


def _add_quickstart(sub) -> None:
    from kvtrain.quickstart import QuickstartSettings

    p = sub.add_parser("quickstart", help=QUICKSTART_HELP)
    defaults = QuickstartSettings()
    p.add_argument("--out", type=Path, default=defaults.out)
    p.add_argument("--steps", type=positive_int, default=defaults.steps, help="distillation steps")
    p.add_argument("--eval-blocks", type=positive_int, default=defaults.eval_blocks, help="held-out blocks for loyalty")
    p.set_defaults(func=cmd_quickstart)


def _add_eval(sub) -> None:
    from kvtrain.eval.cli import add_eval_parsers
    from kvtrain.eval.fidelity import add_fidelity_parser

    p = sub.add_parser("eval", help=EVAL_HELP)
    suites = p.add_subparsers(dest="suite", required=True)
    add_fidelity_parser(suites)
    add_eval_parsers(suites)
    p = suites.add_parser("loyalty", help="KL, top-1 agreement and NLL against the full cache")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default=None, help="'embedded' (default), a .txt/.jsonl file or a datasets name")
    p.add_argument("--split", default="heldout")
    p.add_argument("--context-len", type=positive_int, default=512)
    p.add_argument("--continuation-len", type=positive_int, default=64)
    p.add_argument("--samples", type=positive_int, default=2)
    p.add_argument("--out", type=Path, help="write the result as JSON")
    KVCompressionArguments.add_to_parser(p)
    p.set_defaults(func=cmd_eval_loyalty)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    with said_once():
        args = build_parser(command).parse_args(argv)
    return run_entry_point(lambda: args.func(args), prog="kvtrain", debug=debug)


if __name__ == "__main__":
    sys.exit(main())
