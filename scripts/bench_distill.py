"""Benchmark: does compression-aware distillation make SmolLM2 more loyal under a compressed cache?

Arms, each trained with `train/distill.py`'s code path (its SmolLM2 recipe: LoRA, forward KL to the
full-cache teacher) over 512-token blocks whose first 256 tokens are the prompt:
* `gkv-budget128`: G-KV eviction, 128 kept tokens per KV head (`recipes/smollm2-135m/distill/gkv.yaml`);
* `kqsvd-rank16`: KQ-SVD rank-16 keys and values (calibrated on the embedded train split), projections
  trained jointly with the adapter and saved back (`recipes/smollm2-135m/distill/kqsvd.yaml`);
* `kqsvd-rank16-frozen`: the same with the calibrated projections frozen.
Held-out loyalty is KL(original model with a full cache || model under the compressed cache) on the
continuation tokens, before and after training; "after" uses the compression config the output folder
loads with (trained projections included). The step-time ratio compares a training step under compression
with the same step with every layer dense.

    python scripts/bench_distill.py                 # writes benchmarks/distill/results.md
    # the G-KV run that meets the -30% target (benchmarks/distill/results_gkv_2400_steps.md)
    python scripts/bench_distill.py --arms gkv-budget128 --steps 2400 --lr 4e-4 \
        --report results_gkv_2400_steps.md --train-args "--bf16 true --use_cpu true --block_stride 256"
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from kvtrain.calibrate.run import calibrate
from kvtrain.config import KVCompressionConfig
from kvtrain.eval.heldout import heldout_blocks
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.eval.report import markdown_table, provenance, provenance_lines
from kvtrain.io import atomic_write_text
from kvtrain.models import load_model
from kvtrain.runtime.pretrained import load_compressed
from kvtrain.training.run import main as distill

RECIPES = "recipes/smollm2-135m/distill"
BLOCK, PREFILL = 512, 256
ARMS = ("gkv-budget128", "kqsvd-rank16", "kqsvd-rank16-frozen")


def train(out: Path, recipe: str, steps: int, kv_config: Path, lr: float, extra: list[str]) -> dict:
    folder = distill(
        [
            "--config", f"{RECIPES}/{recipe}", "--output_dir", str(out), "--max_steps", str(steps),
            "--kv_config", str(kv_config), "--gradient_accumulation_steps", "1", "--learning_rate", str(lr),
            "--warmup_steps", "2", "--save_strategy", "no", "--loyalty_blocks", "0", "--logging_steps", "5", *extra,
        ]
    )
    return json.loads((folder / "kvtrain_training.json").read_text())["metrics"]["train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-blocks", type=int, default=6)
    parser.add_argument("--work", type=Path, default=Path("runs/bench_distill"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/distill"))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--report", default="results.md", help="file name of the report under --out")
    parser.add_argument("--train-args", default="", help="extra train/distill.py flags for every run, e.g. '--use_peft false'")
    args = parser.parse_args()
    extra = shlex.split(args.train_args)
    info = provenance()
    args.work.mkdir(parents=True, exist_ok=True)

    base, tokenizer = load_model("smollm2-135m")
    # arm -> (compression config, recipe, flags of that arm)
    arms: dict[str, tuple[KVCompressionConfig, str, list[str]]] = {}
    if "gkv-budget128" in args.arms:
        gkv = {"budget": 128, "sinks": 4, "recent": 16, "query_window": 16, "scorer": {"name": "gkv"}, "schedule": {"interval": 64}}
        arms["gkv-budget128"] = (KVCompressionConfig.from_dict(gkv), "gkv.yaml", [])
    if {"kqsvd-rank16", "kqsvd-rank16-frozen"} & set(args.arms):
        artifacts = calibrate(
            base, tokenizer, out_dir=args.work / "calib", fit=("kqsvd",), rank=16, value_rank=16, num_blocks=16, block_len=BLOCK
        )
        kqsvd = KVCompressionConfig.from_dict(
            {"budget": None, "compression_ratio": 0.0, "lowrank": {"projections": str(artifacts / "projections.safetensors")}}
        )
        if "kqsvd-rank16" in args.arms:
            arms["kqsvd-rank16"] = (kqsvd, "kqsvd.yaml", ["--train_projections", "true"])
        if "kqsvd-rank16-frozen" in args.arms:
            arms["kqsvd-rank16-frozen"] = (kqsvd, "kqsvd.yaml", ["--train_projections", "false"])
    held_out = heldout_blocks(tokenizer, None, "heldout", BLOCK, args.eval_blocks)

    def reference(ids):  # the original model with a full cache (training never touches `base`)
        return base(input_ids=ids).logits

    rows = []
    before_cache: dict[str, object] = {}
    for name, (config, recipe, flags) in arms.items():
        config_path = args.work / f"{name}.json"
        config.save(config_path)
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in before_cache:
            (before_cache[key],) = evaluate_loyalty(
                base, [config], held_out, context_len=PREFILL, method="replay", reference=reference
            )
        before = before_cache[key]
        metrics = train(args.work / name, recipe, args.steps, config_path, args.lr, flags + extra)
        student, _, trained_config = load_compressed(args.work / name)
        (after,) = evaluate_loyalty(
            student, [trained_config], held_out, context_len=PREFILL, method="replay", reference=reference
        )
        rows.append(
            {
                "arm": name,
                "kl_before": before.kl_full_to_compressed,
                "kl_after": after.kl_full_to_compressed,
                "kl_reduction": 1 - after.kl_full_to_compressed / before.kl_full_to_compressed,
                "top1_before": before.top1_agreement,
                "top1_after": after.top1_agreement,
                "nll_after": after.nll_compressed,
                "nll_full": before.nll_full,
                "train_loss": metrics.get("train_loss"),
            }
        )
        if args.timing_steps:
            timed = train(args.work / f"{name}-timing", recipe, args.timing_steps, config_path, args.lr, flags + extra)
            rows[-1]["s_per_step"] = timed["train_runtime"] / args.timing_steps
    timing = "not measured in this run"
    if args.timing_steps:
        plain_path = args.work / "plain.json"
        KVCompressionConfig.from_dict({"budget": 128, "dense_layers": list(range(base.config.num_hidden_layers))}).save(plain_path)
        plain_step = train(args.work / "plain-timing", "gkv.yaml", args.timing_steps, plain_path, args.lr, extra)
        plain_step = plain_step["train_runtime"] / args.timing_steps
        for row in rows:
            row["step_time_ratio"] = row["s_per_step"] / plain_step
        timing = f"plain: {plain_step:.2f} s/step in this run"

    args.out.mkdir(parents=True, exist_ok=True)
    report = (
        "# Compression-aware distillation of SmolLM2-135M-Instruct\n\n"
        + provenance_lines(info)
        + f"- training: the arm's recipe in `{RECIPES}/` (LoRA r=16, forward KL to the full-cache teacher), "
        f"{args.steps} steps of one {BLOCK}-token block (first {PREFILL} = prompt), lr {args.lr}"
        + (f", overrides `{args.train_args}`" if extra else "")
        + "\n"
        f"- loyalty: {args.eval_blocks} held-out blocks, KL(original model, full cache || model under the "
        f"compressed cache) per continuation token, measured by replay (equal to decoding)\n"
        f"- step time: {args.timing_steps} steps with compression vs the same steps with every layer dense "
        f"({timing})\n\n"
        + markdown_table(rows)
    )
    atomic_write_text(args.out / args.report, report)
    print(report)


if __name__ == "__main__":
    main()
