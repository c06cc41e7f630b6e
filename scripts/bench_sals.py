"""Benchmark: SALS on SmolLM2 (latent token selection over pre-RoPE latent keys) against an oracle selection
and a sinks + recent window with the same token count.

Calibrates the SALS basis on the embedded train split, then evaluates on held-out blocks with
`evaluate_loyalty(method="replay")` (equal to step-by-step decoding by the parity tests): KL(full || SALS),
top-1 agreement and NLL over the continuation of each block. Also measures how much of the exact top-k the
latent top-k finds. Writes `benchmarks/sals/results.md` (machine, date, commit).

    python scripts/bench_sals.py                                  # the committed run
    python scripts/bench_sals.py --eval-blocks 1 --block-len 512 --prompt-len 256   # a quick look
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvtrain.artifacts.sals_basis import SALS_BASIS, read_sals_basis
from kvtrain.calibrate.run import calibrate
from kvtrain.config import KVCompressionConfig, SalsConfig
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.eval.report import markdown_table, provenance, provenance_lines
from kvtrain.io import atomic_write_text
from kvtrain.lowrank.sals import compress_keys, latent_queries, latent_scores
from kvtrain.models import head_dim, load_model
from kvtrain.models.rope import model_rope, unrotate
from kvtrain.runtime.routing import observe_attention
from kvtrain.runtime.sals.runtime import head_summed_scores

FRACTIONS = {"SALS-25%": 0.25, "SALS-12.5%": 0.125}
SELECTORS = {"latent": "SALS (latent top-k)", "exact": "oracle (exact post-RoPE top-k)", "recent": "sinks + recent"}


def sals_config(basis: str, rank: int, selector: str, dense: list[int], fraction: float) -> KVCompressionConfig:
    return KVCompressionConfig(
        budget=None, compression_ratio=0.0, dense_layers=dense,
        sals=SalsConfig(basis=basis, rank=rank, token_fraction=fraction, selector=selector),
    )


@torch.no_grad()
def topk_overlap(model, blocks, bases, ranks, dense, prompt_len, fraction, sinks, recent, stride) -> dict[int, float]:
    """Mean |latent top-k ∩ exact top-k| / k over SALS layers and every `stride`-th decode row, per rank.

    Plain forwards (no compression), so both selections see the same keys; sinks and recent tokens are left
    out of both sets (they are always kept), k = ceil(fraction * t) as in the cache."""
    rope = model_rope(model)
    totals = {r: [0.0, 0] for r in ranks}

    def observe(module, query, key, value, mask):
        layer = module.layer_idx
        if layer in dense:
            return None
        s = key.shape[2]
        cos, sin = rope(torch.arange(s)[None])
        k_pre, q_pre = unrotate(key, cos, sin), unrotate(query, cos, sin)
        rows = torch.arange(prompt_len, s, stride)
        exact = head_summed_scores(query[:, :, rows], key)[0]  # [R, S]
        for r in ranks:
            basis = bases[r][layer]
            latent = latent_scores(latent_queries(q_pre[:, :, rows], basis).double(),
                                   compress_keys(k_pre, basis).double(), max(1, r // 2))[0]
            for i, t in enumerate(rows.tolist()):
                k = math.ceil(fraction * t)
                candidates = torch.arange(sinks, t - recent)
                if k == 0 or candidates.numel() <= k:
                    continue
                top_exact = set(candidates[exact[i, candidates].topk(k).indices].tolist())
                top_latent = set(candidates[latent[i, candidates].topk(k).indices].tolist())
                totals[r][0] += len(top_exact & top_latent) / k
                totals[r][1] += 1
        return None

    with observe_attention(model, observe):
        for block in blocks:
            model.model(input_ids=block[None])
    return {r: total / count for r, (total, count) in totals.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-blocks", type=int, default=8)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--eval-blocks", type=int, default=2)
    parser.add_argument("--block-len", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--fraction", type=float, default=0.125, help="critical tokens per stored token")
    parser.add_argument("--overlap-stride", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/sals"))
    args = parser.parse_args(argv)
    info = provenance()
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    config = model.config
    layers = config.num_hidden_layers
    dense = [0, 1, layers - 1]  # the paper's choice: first two and last layer dense
    width = config.num_key_value_heads * head_dim(config)
    ranks = {name: round(width * f) for name, f in FRACTIONS.items()}

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = calibrate(model, tokenizer, out_dir=tmp, fit=("sals",), num_blocks=args.calib_blocks,
                           block_len=args.calib_len, tada_blocks=1, progress=False)
        calib_s = time.perf_counter() - start
        basis = str(folder / SALS_BASIS)
        held = token_blocks(tokenizer, load_texts(None, "heldout"), args.block_len, args.eval_blocks)
        configs, labels = [], []
        for name, rank in ranks.items():
            for selector in SELECTORS:
                configs.append(sals_config(basis, rank, selector, dense, args.fraction))
                labels.append((name, rank, selector))
        configs.append(sals_config(basis, width, "exact", dense, args.fraction))
        labels.append(("full rank", width, "exact"))
        start = time.perf_counter()
        results = evaluate_loyalty(model, configs, held, context_len=args.prompt_len, method="replay")
        eval_s = time.perf_counter() - start
        bases = {r: read_sals_basis(basis, config, rank=r) for r in ranks.values()}
        sals_cfg = configs[0].sals
        overlap = topk_overlap(model, held, bases, list(ranks.values()), dense, args.prompt_len, args.fraction,
                               sals_cfg.sinks, sals_cfg.recent, args.overlap_stride)

    element = next(model.parameters()).element_size()
    full_key = width * element

    def key_bytes(rank: int, selector: str) -> float:
        """Key bytes per token over all layers: dense layers full; SALS layers r latents, except the oracle,
        which has to hold the uncompressed keys it scores with."""
        per_sals_layer = full_key if selector == "exact" else rank * element
        return len(dense) * full_key + (layers - len(dense)) * per_sals_layer

    rows = []
    for (name, rank, selector), res in zip(labels, results):
        rows.append({
            "config": name, "rank r": rank, "selection": SELECTORS[selector],
            "KL(full‖comp)": res.kl_full_to_compressed, "top-1 agree": res.top1_agreement,
            "NLL comp": res.nll_compressed, "NLL full": res.nll_full,
            "key bytes/token": key_bytes(rank, selector), "vs full keys": key_bytes(rank, selector) / (layers * full_key),
        })
    tokens_attended = f"{sals_cfg.sinks} sinks + {sals_cfg.recent} recent + ceil({args.fraction} × stored tokens)"
    overlap_rows = [{"config": name, "rank r": r, "r*": max(1, r // 2), "latent∩exact / k": overlap[r]}
                    for name, r in ranks.items()]
    text = "\n".join([
        "# SALS on SmolLM2-135M: latent token selection vs an oracle and a window at the same token count",
        "",
        provenance_lines(info),
        f"Command: `python scripts/bench_sals.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Basis calibrated on {args.calib_blocks} x {args.calib_len} tokens of the embedded train split "
        f"({calib_s:.0f} s, `--fit sals`). Evaluated on {args.eval_blocks} held-out blocks of {args.block_len} "
        f"tokens: a {args.prompt_len}-token prompt, then {args.block_len - args.prompt_len} teacher-forced decode "
        f"steps, through `evaluate_loyalty(method=\"replay\")` ({eval_s:.0f} s for all rows). Dense layers "
        f"{dense}; every decode step of the other {layers - len(dense)} layers attends {tokens_attended} plus "
        f"itself. r* = r/2; values full precision; joint key width h_kv·d = {width}.",
        "",
        "All three selections run on the same SALS cache (keys reconstructed from rank-r latents); only which "
        "tokens are chosen differs. The oracle scores with the uncompressed post-RoPE keys (replay only), so "
        "its key bytes are those of the full keys; 'full rank' is the oracle at r = h_kv·d, i.e. exact keys: "
        "the cost of sparsity alone. Key bytes count all layers (dense ones hold full keys).",
        "",
        markdown_table(rows),
        "## Overlap of the latent top-k with the exact top-k",
        "",
        f"Plain forwards over the same held-out blocks; every {args.overlap_stride}th decode row of every SALS "
        "layer; k = ceil(fraction × t) among the tokens that are neither sinks nor recent (those are always kept).",
        "",
        markdown_table(overlap_rows),
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()
