"""Benchmark: where a compressed cache's bytes go, every tensor counted, for every method of the evaluation grid.

For each method and budget of a grid (by default benchmarks/memory/grid.yaml: the evaluation grid's methods that
need no calibration; `--grid benchmarks/eval/grid.yaml` adds the low-rank ones and calibrates their KQ-SVD
projections first if missing), prefill a held-out prompt and decode a few greedy steps through the cache, then break down
what it holds per token seen (`kvtrain.eval.cache_bytes`): keys and values by part (codes, scales, means, low-rank
coefficients, full-precision tokens) at 16 bits, the bookkeeping by part (positions, validity flags, merge votes,
scorer state, query window) as held, and their fraction of a 16-bit full cache (`DynamicCache`, the first row).
Bytes do not depend on timing, so the contended machine does not matter here.

    python scripts/bench_memory.py               # writes benchmarks/memory/bytes.csv and README.md
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from transformers import DynamicCache

from kvtrain import CompressedCache, KVCompressionConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.cache_bytes import BOOKKEEPING_PARTS, PARTS, cache_bytes
from kvtrain.eval.report import markdown_table, provenance, provenance_lines
from kvtrain.eval.sweep import FULL, load_grid
from kvtrain.io import atomic_write_text
from kvtrain.models import load_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_eval import CALIB, REPO, ensure_calibration  # noqa: E402  (the grid's projections, same folder)


def measure(model, prompt: torch.Tensor, config: KVCompressionConfig | None, decode_steps: int) -> dict[str, float]:
    cache = DynamicCache() if config is None else CompressedCache.for_model(model, config)
    with torch.no_grad():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        for _ in range(decode_steps):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    return cache_bytes(cache, model.config).to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=Path, default=REPO / "benchmarks" / "memory" / "grid.yaml")
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_memory")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "memory")
    args = parser.parse_args()
    info = provenance()
    if yaml.safe_load(args.grid.read_text()).get("artifacts"):  # low-rank methods: their projections
        ensure_calibration("smollm2-135m", CALIB)
    cells = {(c.method, c.budget): c.config for c in load_grid(args.grid) if c.model == "base" and c.method != FULL}
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    prompt = token_blocks(tokenizer, load_texts(None, split="heldout"), args.context_len, n_blocks=1)
    # Resumable: each measured row is appended to the --work folder at once, and a rerun skips the rows there.
    done_file = args.work / f"rows-{args.context_len}.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["budget"]): r for r in map(json.loads, done_file.read_text().splitlines())} \
        if done_file.exists() else {}
    todo = {("DynamicCache (16-bit reference)", "-"): None, **cells}
    for (method, budget), config in tqdm(todo.items(), desc="methods x budgets"):
        if (method, budget) not in done:
            config = None if config is None else KVCompressionConfig.from_dict(config)
            done[method, budget] = {"method": method, "budget": budget,
                                    **measure(model, prompt, config, args.decode_steps)}
            with done_file.open("a") as f:
                f.write(json.dumps(done[method, budget]) + "\n")
    rows = [done[key] for key in todo]
    columns = ["method", "budget", *(f"bytes_{p}" for p in PARTS), "bytes_per_token", "cache_fraction",
               *(f"bytes_{p}" for p in BOOKKEEPING_PARTS), "bytes_bookkeeping", "cache_fraction_all", "bytes_fixed"]
    args.out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(args.out / "bytes.csv", text.getvalue())
    short = [{k.removeprefix("bytes_"): v for k, v in row.items() if k in columns} for row in rows]
    atomic_write_text(args.out / "README.md", (
        "# Bytes per token seen, every tensor counted\n\n"
        f"SmolLM2-135M (fp32 run, keys and values counted at 16 bits), a {args.context_len}-token held-out prompt "
        f"and {args.decode_steps} greedy decode steps; the methods and budgets of `{args.grid.relative_to(REPO)}`. "
        "Keys and values by part (`codes` ... `residual`, 16-bit equivalent) and their `cache_fraction` of a 16-bit "
        "full cache; then the bookkeeping by part as held (int64 positions, bool flags, fp32 votes, scorer state "
        "and query window), and `cache_fraction_all`, everything over the 16-bit full cache (bookkeeping floats "
        "at 16 bits). `fixed`: bytes of projections held whatever the length (not per token).\n\n"
        + markdown_table(short, [c.removeprefix("bytes_") for c in columns])
        + "\n" + provenance_lines({**info, "command": "python scripts/bench_memory.py " + " ".join(sys.argv[1:])})
    ))


if __name__ == "__main__":
    main()
