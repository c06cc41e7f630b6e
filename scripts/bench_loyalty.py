"""Benchmark: loyalty of every eviction policy on SmolLM2, and decode-step time vs DynamicCache.

Writes `benchmarks/loyalty/results.csv`, `results.md` (with machine, date, commit) and `kl.png`.

    python scripts/bench_loyalty.py                       # the committed run (about 15 minutes on 2 idle cores)
    python scripts/bench_loyalty.py --samples 1 --ratios 0.5 --decode-context 512   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvtrain.config import KVCompressionConfig, MergeConfig, ScorerConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.eval.report import markdown_table, provenance, provenance_lines
from kvtrain.io import atomic_write_text
from kvtrain.models import load_model
from kvtrain.runtime.cache import CompressedCache

# name -> config fields besides the ratio (kvpress convention: the fraction evicted).
POLICIES = {  # every scorer that reads attention sees the same 128 most recent queries
    "streaming": {"scorer": ScorerConfig("streaming")},
    "h2o": {"scorer": ScorerConfig("h2o"), "query_window": 128},
    "snapkv": {"scorer": ScorerConfig("snapkv", {"window": 128}), "query_window": 128},
    "tova": {"scorer": ScorerConfig("tova")},
    "key_norm": {"scorer": ScorerConfig("key_norm")},
    "value_norm": {"scorer": ScorerConfig("value_norm")},
    "expected_attention": {"scorer": ScorerConfig("expected_attention"), "query_window": 128},
    "expected_attention+adakv": {
        "scorer": ScorerConfig("expected_attention"),
        "query_window": 128,
        "selection": "head_adaptive",
    },
    "gkv": {"scorer": ScorerConfig("gkv"), "query_window": 128},
    "gkv (no redundancy)": {"scorer": ScorerConfig("gkv", {"redundancy": False}), "query_window": 128},
    "snapkv+keepkv": {"scorer": ScorerConfig("snapkv", {"window": 128}), "query_window": 128, "merge": MergeConfig()},
}


def policy_config(name: str, ratio: float) -> KVCompressionConfig:
    return KVCompressionConfig(budget=None, compression_ratio=ratio, **POLICIES[name])


@torch.no_grad()
def decode_step_times(model, cache, prompt: torch.Tensor, steps: int) -> list[float]:
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--continuation-len", type=int, default=64)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--decode-context", type=int, default=4096)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/loyalty"))
    args = parser.parse_args()
    info = provenance()  # the code being measured, whatever is committed while this runs

    model, tokenizer = load_model(args.model)
    texts = load_texts(None, split="heldout")
    blocks = token_blocks(tokenizer, texts, args.context_len + args.continuation_len, n_blocks=args.samples)
    grid = [(name, ratio) for ratio in args.ratios for name in args.policies]
    results = evaluate_loyalty(model, [policy_config(n, r) for n, r in grid], blocks, context_len=args.context_len)
    rows = [
        {
            "policy": name,
            "ratio": ratio,
            "kl": res.kl_full_to_compressed,
            "top1": res.top1_agreement,
            "nll": res.nll_compressed,
            "nll_full": res.nll_full,
            "cache_fraction": res.cache_fraction,
        }
        for (name, ratio), res in zip(grid, results)
    ]

    # Decode-step time at a long context: CompressedCache (G-KV, 75% evicted) vs DynamicCache.
    prompt = token_blocks(tokenizer, texts, args.decode_context, n_blocks=1)
    dynamic = decode_step_times(model, DynamicCache(), prompt, args.decode_steps)
    compressed_cache = CompressedCache.for_model(model, policy_config("gkv", 0.75))
    compressed = decode_step_times(model, compressed_cache, prompt, args.decode_steps)
    timing = {
        "context": args.decode_context,
        "steps": args.decode_steps,
        "median_ratio": statistics.median(compressed) / statistics.median(dynamic),
        "mean_ratio": statistics.mean(compressed) / statistics.mean(dynamic),  # includes the compression event
    }

    args.out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.out / "results.csv", buffer.getvalue())
    plot(rows, args.out / "kl.png")
    header = (
        f"# Loyalty of eviction policies on {args.model}\n\n"
        + provenance_lines(info)
        + f"- data: embedded held-out text, {args.samples} samples, {args.context_len}-token contexts compressed at "
        f"prefill, {args.continuation_len}-token real continuations teacher-forced one token at a time\n"
        f"- ratio = fraction of the context evicted; kl = mean KL(full || compressed) per continuation token (nats); "
        f"top1 = agreement of the argmax with the full cache; nll = NLL of the real continuation "
        f"(full cache: nll_full); cache_fraction = bytes held / full-cache bytes\n\n"
    )
    body = "".join(
        f"## ratio {ratio}\n\n" + markdown_table(sorted((r for r in rows if r["ratio"] == ratio), key=lambda r: r["kl"])) + "\n"
        for ratio in args.ratios
    )
    decode = (
        f"## Decode-step time at a {timing['context']}-token context\n\n"
        f"CompressedCache (G-KV, 75% evicted, compression every 128 steps) vs DynamicCache, {timing['steps']} greedy "
        f"steps, same run: median step time ratio **{timing['median_ratio']:.2f}**, mean (including the compression "
        f"event) **{timing['mean_ratio']:.2f}**.\n"
    )
    atomic_write_text(args.out / "results.md", header + body + decode)
    print(header + body + decode)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["policy"] for r in rows):
        points = sorted((r["ratio"], r["kl"]) for r in rows if r["policy"] == name)
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("fraction of the context evicted")
    ax.set_ylabel("KL(full || compressed), nats/token")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
