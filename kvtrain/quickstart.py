"""`kvtrain quickstart`: the whole pipeline on the embedded model and text, in minutes on a CPU.

prepare SmolLM2 -> calibrate per-layer budgets from measured head behaviour -> distil under a G-KV compressed
cache with those budgets (LoRA, forward KL to the full-cache model) -> loyalty before/after on held-out text ->
`report.md` + `report.json` + `loss.png` in the output folder. Each stage is the same code as its own command,
and the distilled checkpoint carries its `kv_compression/` (config + head budgets).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from kvtrain.calibrate.run import calibrate
from kvtrain.config import KVCompressionConfig
from kvtrain.eval.heldout import heldout_blocks
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.eval.report import markdown_table, print_table
from kvtrain.io import atomic_write_text
from kvtrain.models import load_model, prepare_model
from kvtrain.runtime.pretrained import load_compressed
from kvtrain.training.run import main as distill

# Package data (`kvtrain/recipes` is the top-level recipes/ folder), so the quickstart runs from any directory.
RECIPE = Path(__file__).resolve().parent / "recipes" / "smollm2-135m" / "distill" / "gkv.yaml"
RECIPE_BUDGET = 128  # the recipe's kv_budget: the mean the calibrated per-layer budgets keep


@dataclass
class QuickstartSettings:
    out: Path = Path("runs/quickstart")
    steps: int = 60
    block_len: int = 512
    prefill_len: int = 256
    calibration_blocks: int = 4
    eval_blocks: int = 4
    learning_rate: float = 4e-4


def run_quickstart(settings: QuickstartSettings) -> Path:
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    prepare_model("smollm2-135m")
    base, tokenizer = load_model("smollm2-135m")
    timings["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    artifacts = calibrate(
        base,
        tokenizer,
        out_dir=out / "calibration",
        fit=("head-budgets",),
        num_blocks=settings.calibration_blocks,
        block_len=settings.block_len,
        head_budget=RECIPE_BUDGET,
    )
    # The recipe's kv_* fields set the policy; the calibrated per-layer budgets come from this file.
    compression_file = out / "compression.json"
    KVCompressionConfig(budget=RECIPE_BUDGET, layer_budgets=str(artifacts / "head_budgets.json")).save(compression_file)
    timings["calibrate"] = time.perf_counter() - start

    held_out = heldout_blocks(tokenizer, None, "heldout", settings.block_len, settings.eval_blocks)

    def reference(ids):  # the original model with its full cache
        return base(input_ids=ids).logits

    start = time.perf_counter()
    folder = distill(
        [
            "--config", str(RECIPE), "--output_dir", str(out / "model"), "--max_steps", str(settings.steps),
            "--gradient_accumulation_steps", "1", "--learning_rate", str(settings.learning_rate),
            "--warmup_steps", "2", "--save_strategy", "no", "--loyalty_blocks", "0", "--logging_steps", "2",
            "--block_len", str(settings.block_len), "--prefill_len", str(settings.prefill_len),
            "--kv_config", str(compression_file),
        ]
    )
    timings["distill"] = time.perf_counter() - start

    start = time.perf_counter()
    student, _, config = load_compressed(folder)
    (before,) = evaluate_loyalty(base, [config], held_out, context_len=settings.prefill_len, method="replay", reference=reference)
    (after,) = evaluate_loyalty(student, [config], held_out, context_len=settings.prefill_len, method="replay", reference=reference)
    timings["evaluate"] = time.perf_counter() - start

    rows = [
        {"model": name, "kl": r.kl_full_to_compressed, "top1": r.top1_agreement, "nll": r.nll_compressed, "nll_full_cache": r.nll_full}
        for name, r in (("before distillation", before), ("after distillation", after))
    ]
    history = json.loads((folder / "kvtrain_training.json").read_text())["metrics"]["log_history"]
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    _plot_loss(losses, out / "loss.png")
    summary = {
        "compression": config.to_dict(),
        "loyalty": rows,
        "kl_reduction": 1 - after.kl_full_to_compressed / before.kl_full_to_compressed,
        "seconds": timings,
        "model": str(folder),
        "calibration": str(out / "calibration" / "kv_compression"),
    }
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2))
    atomic_write_text(
        out / "report.md",
        f"# kvtrain quickstart: SmolLM2-135M-Instruct under G-KV ({RECIPE_BUDGET} tokens per KV head on average, "
        "per-layer budgets calibrated from head behaviour)\n\n"
        f"Held-out loyalty to the original full-cache model over {settings.eval_blocks} blocks of "
        f"{settings.block_len} tokens (the first {settings.prefill_len} prefilled and compressed, the rest decoded "
        f"with compression every {config.schedule.interval} steps), after {settings.steps} LoRA distillation "
        f"steps:\n\n"
        + markdown_table(rows)
        + f"\nKL reduced by **{summary['kl_reduction']:.0%}**. Time (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
        + f".\n\nThe distilled model (adapter + `kv_compression/`) is in `{folder}`; load it with "
        "`kvtrain.load_compressed`. Training loss: `loss.png`.\n",
    )
    print_table(rows, title="loyalty to the full-cache model (continuation tokens)")
    print(f"KL reduced by {summary['kl_reduction']:.0%}; report: {out / 'report.md'}")
    return out


def _plot_loss(points: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        ax.plot(*zip(*points), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss (forward KL)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
