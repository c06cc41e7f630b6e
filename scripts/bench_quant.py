"""Benchmark: TaDA with per-layer bits chosen from measured sensitivity vs uniform bits, at equal bytes.

Calibrates the TaDA bit plan on SmolLM2 (each layer's output KL when it alone is quantised at 2/4/8 bits,
then the best plan at an average of 4 bits), and compares held-out loyalty through the real cache: every
prompt token archived as packed TaDA codes, the continuation decoded one token at a time.

    python scripts/bench_quant.py                     # writes benchmarks/quant/results.md
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from kvtrain.artifacts.quant_plan import QuantPlan, read_quant_plan, write_quant_plan
from kvtrain.calibrate.run import calibrate
from kvtrain.config import KVCompressionConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.eval.report import markdown_table, provenance, provenance_lines
from kvtrain.io import atomic_write_text
from kvtrain.models import load_model


def quant_config(**quant) -> KVCompressionConfig:
    # Quantisation alone: nothing is evicted, every event archives the recent tokens.
    return KVCompressionConfig.from_dict({"budget": None, "compression_ratio": 0.0, "quant": quant})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--average-bits", type=float, default=4.0)
    parser.add_argument("--calibration-blocks", type=int, default=4)
    parser.add_argument("--sensitivity-blocks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--continuation-len", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_quant"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/quant"))
    parser.add_argument("--report", default="results.md")
    args = parser.parse_args()
    info = provenance()

    model, tokenizer = load_model("smollm2-135m")
    folder = calibrate(
        model, tokenizer, out_dir=args.work, fit=("tada",), num_blocks=args.calibration_blocks,
        tada_blocks=args.sensitivity_blocks, tada_budget=args.average_bits, block_len=args.context_len,
    )
    plan_path = folder / "quant_plan.json"
    plan = read_quant_plan(plan_path)
    reversed_plan = QuantPlan(list(reversed(plan.bits)), plan.group_size, plan.residual_length, plan.budget)
    write_quant_plan(args.work / "reversed_plan.json", reversed_plan)
    configs = {
        f"calibrated plan (mean {sum(plan.bits) / len(plan.bits):.2f} bits)": quant_config(plan=str(plan_path), group_size=plan.group_size),
        "same bits, layers reversed (equal bytes)": quant_config(plan=str(args.work / "reversed_plan.json"), group_size=plan.group_size),
    }
    for bits in sorted({2 ** int(math.log2(args.average_bits)), 2 ** math.ceil(math.log2(args.average_bits))}):
        configs[f"uniform {bits}-bit"] = quant_config(key_bits=bits, value_bits=bits, group_size=plan.group_size)
    texts = load_texts(None, split="heldout")
    blocks = token_blocks(tokenizer, texts, args.context_len + args.continuation_len, n_blocks=args.samples)
    results = evaluate_loyalty(model, list(configs.values()), blocks, context_len=args.context_len)
    rows = [
        {"bits": name, "kl": r.kl_full_to_compressed, "top1": r.top1_agreement, "nll": r.nll_compressed,
         "nll_full": r.nll_full, "cache_fraction": r.cache_fraction}
        for name, r in zip(configs, results)
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    report = (
        "# TaDA: calibrated per-layer bits vs uniform bits on SmolLM2-135M-Instruct\n\n"
        + provenance_lines(info)
        + f"- plan: average {args.average_bits} bits over layers from per-layer sensitivities measured on "
        f"{args.sensitivity_blocks} calibration blocks; per-layer bits {plan.bits}; group size {plan.group_size}\n"
        f"- loyalty: {args.samples} held-out samples, {args.context_len}-token contexts archived as packed codes, "
        f"{args.continuation_len}-token continuations decoded through the cache; kl = KL(full || quantised) per "
        f"continuation token; cache_fraction = bytes held / fp32 full-cache bytes (includes the full-precision "
        f"recent tokens)\n\n"
        + markdown_table(rows)
    )
    atomic_write_text(args.out / args.report, report)
    print(report)


if __name__ == "__main__":
    main()
