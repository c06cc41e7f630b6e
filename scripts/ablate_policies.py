"""Ablation behind the loyalty benchmark: why a policy ranks where it does on SmolLM2.

One setting (75% of 1024-token held-out contexts evicted at prefill, 64-token continuations), measured by
replay (equal to step-by-step decoding by the parity tests). Writes `benchmarks/loyalty/ablation.md`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvtrain.config import KVCompressionConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.eval.report import markdown_table, provenance, provenance_lines
from kvtrain.io import atomic_write_text
from kvtrain.models import load_model


def config(scorer: str, params: dict | None = None, window: int = 16) -> KVCompressionConfig:
    return KVCompressionConfig.from_dict(
        {"budget": None, "compression_ratio": 0.75, "query_window": window, "scorer": {"name": scorer, "params": params or {}}}
    )


GRID = {
    "h2o, 128 queries": config("h2o", window=128),
    "h2o, all 1024 prompt queries": config("h2o", window=1024),
    "snapkv, 16 queries": config("snapkv"),
    "snapkv, 128 queries": config("snapkv", {"window": 128}, 128),
    "gkv, 16 queries": config("gkv"),
    "gkv, 128 queries": config("gkv", window=128),
    "gkv, 128 queries, mix_lambda 0.9": config("gkv", {"mix_lambda": 0.9}, 128),
    "gkv, 128 queries, no redundancy": config("gkv", {"redundancy": False}, 128),
    "expected_attention, epsilon 0.02 (paper note)": config("expected_attention", {"epsilon": 0.02}, 1024),
    "expected_attention, epsilon 0 (default)": config("expected_attention", {}, 1024),
    "expected_attention, epsilon 0, 128 queries": config("expected_attention", {}, 128),
    "expected_attention, no value norm": config("expected_attention", {"use_vnorm": False}, 1024),
    "expected_attention, no covariance, epsilon 0.02": config("expected_attention", {"use_covariance": False, "epsilon": 0.02}, 1024),
    "expected_attention, 64 future positions, epsilon 0.02": config("expected_attention", {"n_future_positions": 64, "epsilon": 0.02}, 1024),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/loyalty/ablation.md"))
    args = parser.parse_args()
    info = provenance()
    model, tokenizer = load_model("smollm2-135m")
    blocks = token_blocks(tokenizer, load_texts(None, split="heldout"), 1024 + 64, n_blocks=args.samples)
    results = evaluate_loyalty(model, list(GRID.values()), blocks, context_len=1024, method="replay")
    rows = [{"variant": name, "kl": r.kl_full_to_compressed, "top1": r.top1_agreement} for name, r in zip(GRID, results)]
    report = (
        "# Policy ablation on SmolLM2-135M-Instruct (75% of a 1024-token context evicted)\n\n"
        + provenance_lines(info)
        + f"- {args.samples} held-out samples, 64-token continuations, measured by replay\n\n"
        + markdown_table(rows)
    )
    atomic_write_text(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
