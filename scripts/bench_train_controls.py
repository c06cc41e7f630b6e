"""Benchmark: does training pay off, with the full-cache control and seeds (the checkpoints of
`scripts/train_eval_checkpoints.sh`).

    python scripts/bench_train_controls.py [--blocks 8]    # resumable: models already scored are kept

On the same filtered held-out blocks (context 256 tokens prefilled and compressed, 256 continuation tokens scored
as decoded, compression events included; computed by replay), for each recipe: the base model under the recipe's
compression and with its full cache, every trained seed and the full-cache control (same run, the student's
forward uncompressed) under the same compression and with their own full cache. Per block: the continuation's
mean NLL and KL(base full cache || model). Differences are paired on blocks, 95% intervals by a percentile
bootstrap over blocks; gap closed = (trained - base) / (reference - base) on NLL, against the base's full cache
and against the trained model's own, its interval from the same bootstrap. Writes
`benchmarks/eval/training_controls.md` and `.json` with machine, date, commit and command; per-model scores are
kept in `runs/train-controls/` until all are there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "runs" / "eval-train"
SCORES = REPO / "runs" / "train-controls"
OUT = REPO / "benchmarks" / "eval"
CONTEXT, CONTINUATION = 256, 256
# recipe -> (label, trained seeds' folders, the full-cache control's folder)
RECIPES = {
    "gkv": ("G-KV budget 128", ["gkv", "gkv-seed43"], "gkv-control"),
    "gkv-tada4": ("G-KV 87.5% x TaDA 4-bit (10.5x)", ["gkv-tada4", "gkv-tada4-seed43"], "gkv-tada4-control"),
}
BOOTSTRAP = 10_000


def recipe_config(recipe: str):
    """The compression config the recipe trains under (and every arm of it is evaluated with)."""
    from kvtrain.training.run import parse_args

    kv_args = parse_args(["--config", str(REPO / f"recipes/smollm2-135m/distill/{recipe}.yaml"), "--output_dir", "unused"])[1]
    return kv_args.to_config()


def block_scores(model, ids, config, base_full_logp):
    """(mean NLL of the continuation, mean KL(base full || model)) of one block, under `config` (None: full)."""
    from kvtrain.runtime.replay import replay_compression
    from kvtrain.runtime.routing import use_kvtrain_attention

    use_kvtrain_attention(model)
    with torch.no_grad():
        if config is None:
            logits = model(input_ids=ids, use_cache=False).logits
        else:
            with replay_compression(model, config, prefill_len=CONTEXT):
                logits = model(input_ids=ids, use_cache=False).logits
    logp = F.log_softmax(logits[0, CONTEXT - 1 : -1].float(), -1)
    if not torch.isfinite(logp).all():
        raise SystemExit("non-finite log-probabilities: no score can be computed from them")
    nll = -logp.gather(-1, ids[0, CONTEXT:, None])[:, 0].mean().item()
    kl = 0.0 if base_full_logp is None else (base_full_logp.exp() * (base_full_logp - logp)).sum(-1).mean().item()
    return logp, nll, kl


def score_model(name, source, config, blocks, base_full):
    """{"compressed": [(nll, kl) per block], "full": [...]}, cached in SCORES/<name>.json."""
    from kvtrain.eval.loading import load_for_eval

    path = SCORES / f"{name}.json"
    if path.is_file():
        scores = json.loads(path.read_text())
        if scores["blocks"] == len(blocks):
            return scores
    model, _, own_config = load_for_eval(source)
    config = config or own_config
    scores = {"blocks": len(blocks), "compressed": [], "full": []}
    for i, ids in enumerate(blocks):
        ids = ids[None]
        reference = None if base_full is None else base_full[i]
        scores["full"].append(block_scores(model, ids, None, reference)[1:])
        scores["compressed"].append(block_scores(model, ids, config, reference)[1:])
        print(f"[controls] {name} block {i + 1}/{len(blocks)}", file=sys.stderr, flush=True)
    SCORES.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(scores))
    tmp.replace(path)
    return scores


def bootstrap(statistic, n_blocks, seed=0):
    """(point, low, high): `statistic(index tensor)` on all blocks and its 95% percentile bootstrap over blocks."""
    point = statistic(torch.arange(n_blocks))
    draws = torch.randint(0, n_blocks, (BOOTSTRAP, n_blocks), generator=torch.Generator().manual_seed(seed))
    values = torch.tensor([statistic(d) for d in draws])
    values = values[torch.isfinite(values)]
    return point, values.quantile(0.025).item(), values.quantile(0.975).item()


def fmt(triple, digits=3, pct=False):
    scale, unit = (100, "%") if pct else (1, "")
    point, low, high = (v * scale for v in triple)
    return f"{point:+.{digits}f}{unit} [{low:+.{digits}f}, {high:+.{digits}f}]"


def analyse(recipe, label, base, trained, control):
    """Markdown rows and the JSON record of one recipe."""
    col = lambda s, cache, k: torch.tensor([b[k] for b in s[cache]])  # noqa: E731
    b_comp, b_full = col(base, "compressed", 0), col(base, "full", 0)
    rows, record = [], {"recipe": recipe, "arms": {}}
    n = len(b_comp)
    for arm, s in [*((f"seed {i + 1}", t) for i, t in enumerate(trained)), ("control (full-cache training)", control)]:
        comp, own = col(s, "compressed", 0), col(s, "full", 0)
        kl_b, kl_t = col(base, "compressed", 1), col(s, "compressed", 1)
        c_comp = col(control, "compressed", 0)
        entry = {
            "ppl_compressed": comp.mean().exp().item(), "ppl_own_full": own.mean().exp().item(),
            "d_nll_vs_base": bootstrap(lambda i: (comp[i] - b_comp[i]).mean().item(), n),
            "d_kl_vs_base": bootstrap(lambda i: (kl_t[i] - kl_b[i]).mean().item(), n),
            "gap_closed_vs_base_full": bootstrap(
                lambda i: ((b_comp[i] - comp[i]).mean() / (b_comp[i] - b_full[i]).mean()).item(), n),
            "gap_closed_vs_own_full": bootstrap(
                lambda i: ((b_comp[i] - comp[i]).mean() / (b_comp[i] - own[i]).mean()).item(), n),
            "d_nll_vs_control": bootstrap(lambda i: (comp[i] - c_comp[i]).mean().item(), n),
            "kl_compressed": kl_t.mean().item(),
        }
        record["arms"][arm] = entry
        rows.append(f"| {label} | {arm} | {entry['ppl_compressed']:.3f} | {entry['ppl_own_full']:.3f} | "
                    f"{fmt(entry['d_nll_vs_base'], 4)} | {fmt(entry['d_kl_vs_base'], 4)} | "
                    f"{fmt(entry['gap_closed_vs_base_full'], 1, pct=True)} | "
                    f"{fmt(entry['gap_closed_vs_own_full'], 1, pct=True)} | "
                    + ("-" if arm.startswith("control") else fmt(entry["d_nll_vs_control"], 4)) + " |")
    seeds = [record["arms"][f"seed {i + 1}"] for i in range(len(trained))]
    spread = {k: (min(s[k][0] for s in seeds), max(s[k][0] for s in seeds))
              for k in ("d_nll_vs_base", "gap_closed_vs_base_full", "gap_closed_vs_own_full", "d_nll_vs_control")}
    record["seed_range"] = spread
    record["base"] = {"ppl_compressed": b_comp.mean().exp().item(), "ppl_full": b_full.mean().exp().item(),
                      "kl_compressed": col(base, "compressed", 1).mean().item()}
    return rows, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8, help="held-out blocks of 512 tokens (256 scored each)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--base-only", action="store_true",
                        help="score the base model only (while the arms train); the table needs every arm")
    args = parser.parse_args()
    recipes = {name: RECIPES[name] for name in args.recipes}
    torch.set_num_threads(1)

    from kvtrain import load_model
    from kvtrain.eval.heldout import heldout_blocks

    missing = [f for _, seeds, control in recipes.values() for f in [*seeds, control]
               if not (TRAINED / f / "kvtrain_training.json").is_file()]
    if missing and not args.base_only:  # before any work: the table needs every arm
        print(f"{TRAINED}: missing trained arms {missing}; run scripts/train_eval_checkpoints.sh first", file=sys.stderr)
        sys.exit(2)
    load_before, start = os.getloadavg()[1], time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    blocks = heldout_blocks(tokenizer, "embedded", "heldout", CONTEXT + CONTINUATION, args.blocks)
    if len(blocks) < args.blocks:
        sys.exit(f"--blocks {args.blocks}: the filtered held-out split has only {len(blocks)} blocks")
    with torch.no_grad():  # the reference of every KL: the base model's full cache
        base_full = [F.log_softmax(model(input_ids=b[None], use_cache=False).logits[0, CONTEXT - 1 : -1].float(), -1)
                     for b in blocks]
    rows, records = [], []
    for recipe, (label, seeds, control) in recipes.items():
        base = score_model(f"base-{recipe}", "smollm2-135m", recipe_config(recipe), blocks, base_full)
        if args.base_only:
            continue
        trained = [score_model(f, str(TRAINED / f), None, blocks, base_full) for f in seeds]
        ctrl = score_model(control, str(TRAINED / control), None, blocks, base_full)
        recipe_rows, record = analyse(recipe, label, base, trained, ctrl)
        rows += recipe_rows
        records.append(record)
    if args.base_only:
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    runs = {f: json.loads((TRAINED / f / "kvtrain_training.json").read_text())["arguments"]
            for _, seeds, c in recipes.values() for f in [*seeds, c]}
    steps = {f: (a["training"]["max_steps"], a["training"]["seed"], a["distillation"]["student_cache"])
             for f, a in runs.items()}
    header = [
        "# Does training pay off? Controls and seeds",
        "",
        f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch threads 1; "
        f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}",
        f"- command: `python scripts/bench_train_controls.py --recipes {' '.join(args.recipes)} --blocks {args.blocks}` after "
        "`scripts/train_eval_checkpoints.sh` (see README.md next to this file for the steps run)",
        f"- {args.blocks} filtered held-out blocks x {CONTINUATION} scored tokens (context {CONTEXT}, compressed), "
        f"replay; 95% intervals: percentile bootstrap over blocks ({BOOTSTRAP} draws), paired on blocks",
        f"- scoring took {(time.perf_counter() - start) / 60:.1f} min; 5-minute load {load_before:.1f} at the start, "
        f"{os.getloadavg()[1]:.1f} at the end (shared machine)",
        f"- trained arms (max_steps, seed, student_cache) as recorded: {steps}",
        "",
    ]
    for r in records:
        b = r["base"]
        header.append(f"- {r['recipe']}: base perplexity under compression {b['ppl_compressed']:.3f}, full cache "
                      f"{b['ppl_full']:.3f}, KL {b['kl_compressed']:.4f}; seed range of gap closed vs base full "
                      f"{r['seed_range']['gap_closed_vs_base_full'][0] * 100:+.1f}% to "
                      f"{r['seed_range']['gap_closed_vs_base_full'][1] * 100:+.1f}%")
    table = [
        "",
        "| recipe | arm | ppl compressed | ppl own full cache | dNLL vs base (same compression) | dKL vs base | "
        "gap closed vs base full | gap closed vs own full | dNLL vs control |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "dNLL and dKL: nats per token, trained minus base (negative = better); KL to the base model's full cache. "
        "A difference is real only where its interval excludes 0.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training_controls.md").write_text("\n".join(header + table) + "\n")
    (args.out / "training_controls.json").write_text(json.dumps({"blocks": args.blocks, "commit": commit,
                                                                 "recipes": records}, indent=1) + "\n")
    print("\n".join(header + table))


if __name__ == "__main__":
    main()
