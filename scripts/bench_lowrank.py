"""Benchmark: low-rank keys/values on SmolLM2 (KQ-SVD vs K-SVD vs Eigen Attention), the global rank
allocator, and calibration throughput.

Calibrates on the embedded train split and evaluates on the held-out split (`kvtrain.data`). Writes
`benchmarks/lowrank/results.md` and `results.csv` (machine, date, commit).

    python scripts/bench_lowrank.py                      # the committed run (16 x 512 calibration, 4 x 512 held out)
    python scripts/bench_lowrank.py --calib-blocks 4 --eval-blocks 1 --block-len 256   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvtrain.calibrate.fit import RankChoice, fit_projections, kqsvd_spectra, o_proj_weights
from kvtrain.calibrate.run import calibrate
from kvtrain.calibrate.statistics import StatisticsCollector
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.fidelity import FidelityVariant, evaluate_fidelity, summarise
from kvtrain.eval.report import markdown_table, provenance, provenance_lines
from kvtrain.io import atomic_write_text
from kvtrain.lowrank import allocate_ranks, kq_objective
from kvtrain.lowrank.kqsvd import output_gram
from kvtrain.models import load_model
from kvtrain.models.shape import ModelShape
from kvtrain.runtime.routing import observe_attention

METHODS = ("kqsvd", "ksvd", "eigen")
ALL_GROUPS = ("grams", "query_stats", "head_behaviour")


@torch.no_grad()
def interleaved_throughput(model, blocks: torch.Tensor) -> tuple[StatisticsCollector, float, float, float]:
    """Seconds of plain forwards (with and without the LM head) and of calibration forwards (decoder stack
    only, every statistics group), block by block in turn so that load from other processes hits all alike.
    Returns the filled collector too."""
    collector = StatisticsCollector(ModelShape.of(model), ALL_GROUPS)
    plain = base = calib = 0.0
    model(input_ids=blocks[:1])  # warm-up
    for block in blocks:
        start = time.perf_counter()
        model(input_ids=block[None])
        plain += time.perf_counter() - start
        start = time.perf_counter()
        model.model(input_ids=block[None])
        base += time.perf_counter() - start
        start = time.perf_counter()
        with observe_attention(model, collector.observe):
            collector.start_block(block)
            model.model(input_ids=block[None])
        calib += time.perf_counter() - start
    return collector, plain, base, calib


def merged(spectra: torch.Tensor) -> torch.Tensor:
    """A layer's spectrum for allocation: adding rank r+1 removes sum_h s_{h,r+1}^2 of error."""
    return spectra.to(torch.float64).pow(2).sum(dim=0).sqrt()


def layer_objectives(collector: StatisticsCollector, o_proj: list[torch.Tensor], projections, side: str) -> list[float]:
    """Per layer calibration objective (summed over KV heads) of the key or the value side."""
    if side == "key":
        return [float(kq_objective(g.key_gram, g.query_gram, p).sum()) for g, p in zip(collector.grams, projections.keys)]
    return [float(kq_objective(v.value_gram, output_gram(w, v.num_kv_heads, v.head_dim), p).sum())
            for v, w, p in zip(collector.values, o_proj, projections.values)]


def summed_objectives(collector: StatisticsCollector, o_proj: list[torch.Tensor], projections) -> tuple[float, float]:
    """Calibration KQ-SVD objectives summed over layers and heads: ||KQ^T - KAB^TQ^T||^2 and the value one."""
    return sum(layer_objectives(collector, o_proj, projections, "key")), sum(
        layer_objectives(collector, o_proj, projections, "value"))


def log(message: str, started: float) -> None:
    print(f"[bench_lowrank {time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-blocks", type=int, default=16)
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--block-len", type=int, default=512)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--budget-rank", type=int, default=16, help="uniform rank the allocator is compared with")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/lowrank"))
    # One thread by default: on the shared 2-core machines, two threads stall on every small op whenever
    # another process holds a core (fits took minutes instead of seconds).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = provenance()  # the code being measured, whatever is committed while this runs

    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    layers = model.config.num_hidden_layers
    calib = token_blocks(tokenizer, load_texts(None, "train"), args.block_len, args.calib_blocks)
    held = token_blocks(tokenizer, load_texts(None, "heldout"), args.block_len, args.eval_blocks)

    # (c) throughput, and the statistics every fit below uses.
    log("model loaded; timing plain and calibration forwards", started)
    collector, plain_s, base_s, calib_s = interleaved_throughput(model, calib)
    log("running calibrate()", started)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        calibrate(model, tokenizer, out_dir=tmp, fit=("kqsvd", "query-stats", "head-budgets"),
                  num_blocks=args.calib_blocks, block_len=args.block_len, rank=args.budget_rank, progress=False)
        calibrate_s = time.perf_counter() - start

    log("fitting", started)
    o_proj = o_proj_weights(model)
    key_spectra, value_spectra = kqsvd_spectra(collector.grams, collector.values, o_proj)

    # (a) methods x ranks, keys and values at the same rank.
    variants, projections = [], {}
    for rank in args.ranks:
        for method in METHODS:
            proj = fit_projections(collector.grams, collector.values, o_proj, method, [rank] * layers, [rank] * layers)
            projections[(method, rank)] = proj
            variants.append(FidelityVariant(f"{method} r={rank}", proj.keys, proj.values))
    # (b) global allocator at the same total rank (same bytes: every layer has the same heads) as uniform.
    total = args.budget_rank * layers
    key_ranks = RankChoice(rank_budget=total).ranks(key_spectra)
    value_ranks = RankChoice(rank_budget=total).ranks(value_spectra)
    allocated = fit_projections(collector.grams, collector.values, o_proj, "kqsvd", key_ranks, value_ranks)
    variants.append(FidelityVariant(f"kqsvd allocated (total {total})", allocated.keys, allocated.values))
    # Allocator on per-layer normalised spectra: minimises the sum of per-layer RELATIVE squared errors.
    rel_key = allocate_ranks([merged(s) / merged(s).norm() for s in key_spectra], total)
    rel_value = allocate_ranks([merged(s) / merged(s).norm() for s in value_spectra], total)
    relative = fit_projections(collector.grams, collector.values, o_proj, "kqsvd", rel_key, rel_value)
    variants.append(FidelityVariant(f"kqsvd allocated relative (total {total})", relative.keys, relative.values))
    # Values alone (keys full rank): separates the value projection from the softmax change caused by keys.
    variants += [FidelityVariant(f"{m} r={r} values only", None, projections[(m, r)].values)
                 for r in args.ranks for m in METHODS]
    log(f"evaluating {len(variants)} variants on held-out blocks", started)
    rows = evaluate_fidelity(model, held, variants)
    # The same errors on calibration blocks separate "causal part / relative metric" from "held-out data".
    method_variants = variants[: len(args.ranks) * len(METHODS)] + variants[-len(args.ranks) * len(METHODS):]
    rows_on_calib = evaluate_fidelity(model, calib[: args.eval_blocks], method_variants)
    log("evaluated", started)
    summary = {s["variant"]: s for s in summarise(rows)}

    method_rows = []
    for rank in args.ranks:
        for method in METHODS:
            s = summary[f"{method} r={rank}"]
            key_obj, value_obj = summed_objectives(collector, o_proj, projections[(method, rank)])
            method_rows.append({"rank": rank, "method": method, **{k: v for k, v in s.items() if k != "variant"},
                                "calib_key_objective": key_obj, "calib_value_objective": value_obj})
    # Per layer: is KQ-SVD the lowest at every rank? On the calibration objective it must be (Eckart-Young);
    # the held-out causal-part errors are a different quantity.
    per_layer_losses = []
    for rank in args.ranks:
        for side in ("key", "value"):
            objective = {m: layer_objectives(collector, o_proj, projections[(m, rank)], side) for m in METHODS}
            lost = [l for l in range(layers)
                    if objective["kqsvd"][l] > min(objective["ksvd"][l], objective["eigen"][l]) * (1 + 1e-9)]
            per_layer_losses.append({"rank": rank, "metric": f"calibration {side} objective",
                                     "layers where kqsvd is not lowest": lost})
        for data, source in (("held-out", rows), ("calibration blocks", rows_on_calib)):
            for metric, suffix in (("logit_error", ""), ("output_error", ""), ("output_error", " values only")):
                by = {m: {r["layer"]: r[metric] for r in source if r["variant"] == f"{m} r={rank}{suffix}"}
                      for m in METHODS}
                lost = [l for l in range(layers) if by["kqsvd"][l] > min(by["ksvd"][l], by["eigen"][l])]
                per_layer_losses.append({"rank": rank, "metric": f"{metric}{suffix} ({data})",
                                         "layers where kqsvd is not lowest": lost})

    uniform = projections[("kqsvd", args.budget_rank)]
    alloc_rows = []
    for name, proj, variant in (
        (f"uniform r={args.budget_rank}", uniform, f"kqsvd r={args.budget_rank}"),
        (f"allocated (total {total})", allocated, f"kqsvd allocated (total {total})"),
        (f"allocated, relative objective (total {total})", relative, f"kqsvd allocated relative (total {total})"),
    ):
        key_obj, value_obj = summed_objectives(collector, o_proj, proj)
        s = summary[variant]
        alloc_rows.append({"ranks": name, "total_key_rank": sum(proj.key_ranks), "total_value_rank": sum(proj.value_ranks),
                           "calib_key_objective": key_obj, "calib_value_objective": value_obj,
                           "logit_error_mean": s["logit_error_mean"], "logit_error_worst": s["logit_error_worst"],
                           "output_error_mean": s["output_error_mean"], "output_error_worst": s["output_error_worst"]})
    tokens = calib.numel()
    throughput = {"calibration tokens": tokens, "plain forward s (with LM head)": plain_s,
                  "plain forward s (decoder only)": base_s, "calibration forward s": calib_s,
                  "ratio vs plain": plain_s / calib_s, "ratio vs decoder only": base_s / calib_s,
                  "calibrate() s (pass, checkpoints, fits, writes)": calibrate_s,
                  "calibrate() ratio vs plain": plain_s / calibrate_s}

    args.out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(method_rows[0]))
    writer.writeheader()
    writer.writerows(method_rows)
    atomic_write_text(args.out / "results.csv", buf.getvalue())
    atomic_write_text(args.out / "per_layer.csv", _csv(rows))
    body = [
        "# Low-rank keys/values on SmolLM2-135M",
        "",
        provenance_lines(info).rstrip("\n"),
        f"- calibration: {args.calib_blocks} x {args.block_len} tokens of the embedded train split; evaluation: "
        f"{args.eval_blocks} x {args.block_len} tokens of the held-out split",
        f"- wall time of this script: {time.perf_counter() - started:.0f} s",
        "",
        "Errors are relative Frobenius errors per layer (`kvtrain.eval.fidelity`): attention logits (causal part, all",
        "query heads) and the attention-layer output after o_proj; keys and values low-rank at the same rank.",
        "Mean over the 30 layers and the worst layer. Objectives are the calibration-set KQ-SVD objectives",
        "summed over layers and heads (`||KQ^T - KAB^TQ^T||_F^2`, and the value one with stacked o_proj slices).",
        "",
        "## (a) KQ-SVD vs K-SVD vs Eigen Attention",
        "",
        markdown_table(method_rows),
        "Per layer:",
        "",
        markdown_table(per_layer_losses),
        "## (b) Global rank allocator vs uniform rank (same total rank, so same bytes)",
        "",
        markdown_table(alloc_rows),
        f"Allocated key ranks: {key_ranks}",
        "",
        f"Allocated value ranks: {value_ranks}",
        "",
        f"Allocated key ranks, relative objective: {rel_key}",
        "",
        f"Allocated value ranks, relative objective: {rel_value}",
        "",
        "## (c) Calibration throughput",
        "",
        markdown_table([throughput]),
    ]
    atomic_write_text(args.out / "results.md", "\n".join(body) + "\n")
    print("\n".join(body))


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


if __name__ == "__main__":
    main()
