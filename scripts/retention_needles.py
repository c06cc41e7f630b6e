"""Needle survival per training-free policy: the retrieval suite's pass-key haystacks (held-out text) are prefilled
through SmolLM2's compressed cache at 4x and 8x (compression_ratio 0.75 / 0.875, 4 sinks, 16 recent tokens, as
the defaults); the score is the share of the pass key's (token, layer, KV head) triples held after the prefill
compression (`scripts/needle_survival.py`'s measure). KVzip's prefill runs inside the table of its reconstruction
pass. Resumable: one CSV row per (item, policy, ratio), appended as measured; the summary (mean, 95% bootstrap
interval over items, all arms on the same items) is rewritten from the CSV.

    python scripts/retention_needles.py --out benchmarks/retention
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvtrain import load_model  # noqa: E402
from kvtrain.config import KVCompressionConfig, ScorerConfig  # noqa: E402
from kvtrain.eval.suites.retrieval import RetrievalOptions, RetrievalSuite  # noqa: E402
from kvtrain.io import atomic_write_text  # noqa: E402
from kvtrain.policies.kvzip import REPEAT_PROMPT, kvzip_table, reconstruction_scores  # noqa: E402
from scripts.bench_grpo import bootstrap  # noqa: E402
from scripts.needle_survival import kept_share  # noqa: E402

POLICIES = ("snapkv", "gkv", "expected_attention", "kvzip")
RATIOS = {"4x": 0.75, "8x": 0.875}
FIELDS = ["item", "policy", "ratio", "kept"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "retention")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "needles.csv"
    done = {(r["item"], r["policy"], r["ratio"]) for r in _read(rows_path)}
    model, tokenizer = load_model("smollm2-135m")
    repeat_ids = tokenizer(REPEAT_PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    items = [(f"s{seed}-{item.id}", item) for seed in args.seeds for item in RetrievalSuite().build_items(
        tokenizer, RetrievalOptions(lengths=tuple(args.lengths), depths=tuple(args.depths), kinds=("passkey",),
                                    seed=seed))]
    new = not rows_path.exists()
    with rows_path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for name, item in tqdm(items, desc="haystacks"):
            haystack, answer = item.pieces[0][1], item.checks[0].reference
            table = None
            for policy in POLICIES:
                for ratio_name, ratio in RATIOS.items():
                    if (name, policy, ratio_name) in done:
                        continue
                    config = KVCompressionConfig(budget=None, compression_ratio=ratio, scorer=ScorerConfig(policy))
                    scope = contextlib.nullcontext()
                    if policy == "kvzip":
                        if table is None:
                            ids = tokenizer(haystack, return_tensors="pt")["input_ids"]
                            table = reconstruction_scores(model, ids, None, repeat_ids, chunk_size=128)
                        scope = kvzip_table(table)
                    with scope:
                        kept = kept_share(model, tokenizer, config, haystack, answer)
                    writer.writerow({"item": name, "policy": policy, "ratio": ratio_name, "kept": f"{kept:.4f}"})
                    handle.flush()
    _summarise(args.out, _read(rows_path))


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _summarise(out: Path, rows: list[dict]) -> None:
    items = sorted({r["item"] for r in rows})
    by_key = {(r["item"], r["policy"], r["ratio"]): float(r["kept"]) for r in rows}
    lines = ["| policy | ratio | needle tokens kept (mean) | 95% interval | items |", "|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    for ratio in RATIOS:
        for policy in POLICIES:
            # Paired: only the items every arm has measured at this ratio.
            common = [i for i in items if all((i, p, ratio) in by_key for p in POLICIES)]
            if not common:
                continue
            values = torch.tensor([by_key[(i, policy, ratio)] for i in common])
            low, high = bootstrap(values, 2000, gen)
            lines.append(f"| {policy} | {ratio} | {values.mean():.3f} | [{low:.3f}, {high:.3f}] | {len(common)} |")
    lines += ["", "Paired differences (same items):", "",
              "| difference | ratio | mean | 95% interval |", "|---|---|---|---|"]
    for ratio in RATIOS:
        common = [i for i in items if all((i, p, ratio) in by_key for p in POLICIES)]
        for other in POLICIES[:-1]:
            if not common:
                continue
            diffs = torch.tensor([by_key[(i, "kvzip", ratio)] - by_key[(i, other, ratio)] for i in common])
            low, high = bootstrap(diffs, 2000, gen)
            lines.append(f"| kvzip - {other} | {ratio} | {diffs.mean():+.3f} | [{low:+.3f}, {high:+.3f}] |")
    atomic_write_text(out / "needles.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
