"""Attention fidelity of low-rank and/or TaDA-quantised keys and values, per layer, on held-out text.

For every layer of a plain full-precision forward, the layer's own post-RoPE queries ``Q``, keys ``K`` and
values ``V`` are taken as they are (errors do not propagate between layers) and compared with what a
compressed cache would give:

* logits ``L = Q K^T * scaling`` per query head (causal part only, ``j <= i``) against
  ``L^ = (Q B)(K~)^T * scaling`` where the stored keys ``K~`` are ``K A`` (low rank) and/or their TaDA round
  trip; ``logit_error = ||L - L^||_F / ||L||_F`` pooled over heads and blocks;
* the attention layer output (after o_proj, without its bias): ``O = concat_j(softmax(L_j) V) W_O^T``
  against ``O^ = concat_j(softmax(L^_j) V~ B_v^T) W_O^T``, ``V~ = V A_v`` and/or quantised;
  ``output_error = ||O - O^||_F / ||O||_F``.

Pooled means ``sqrt(sum of squared errors / sum of squared references)`` over all heads and blocks.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kvtrain.arguments import positive_int
from kvtrain.artifacts.calibration import artifact_folder, load_artifacts
from kvtrain.artifacts.projections import METHODS, LowRankPair
from kvtrain.calibrate.fit import fit_projections, o_proj_weights
from kvtrain.calibrate.statistics import collect_statistics
from kvtrain.data import load_texts, token_blocks
from kvtrain.eval.report import print_table
from kvtrain.io import atomic_write_text, check_writable
from kvtrain.lowrank import project_cache, project_queries
from kvtrain.models import load_model
from kvtrain.models.limits import check_sequence
from kvtrain.models.loading import load_config
from kvtrain.quant import fake_quantize
from kvtrain.runtime.routing import observe_attention


@dataclass
class FidelityVariant:
    """One compressed configuration: per-layer low-rank pairs and/or TaDA bits (None: that part is off).

    ``key_bits`` / ``value_bits`` are one bit-width or one per layer; ``group_size`` None quantises each stored
    head vector as one group.
    """

    name: str
    keys: Sequence[LowRankPair] | None = None
    values: Sequence[LowRankPair] | None = None
    key_bits: int | Sequence[int] | None = None
    value_bits: int | Sequence[int] | None = None
    group_size: int | None = None

    def at(self, layer: int) -> tuple[LowRankPair | None, LowRankPair | None, int | None, int | None]:
        def pick(x):
            return x if x is None or isinstance(x, int) else x[layer]

        return pick(self.keys), pick(self.values), pick(self.key_bits), pick(self.value_bits)


def _store(x: Tensor, pair: LowRankPair | None, bits: int | None, group_size: int | None) -> Tensor:
    stored = x if pair is None else project_cache(x, pair)
    if bits is not None:
        stored = fake_quantize(stored, bits, group_size or stored.shape[-1])
    return stored


def _expand(x: Tensor, heads: int) -> Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def layer_errors(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    o_proj_weight: Tensor,
    scaling: float,
    key_pair: LowRankPair | None = None,
    value_pair: LowRankPair | None = None,
    key_bits: int | None = None,
    value_bits: int | None = None,
    group_size: int | None = None,
) -> dict[str, float]:
    """Squared error and reference sums of one layer: ``logit_err``, ``logit_ref``, ``output_err``, ``output_ref``.

    ``query`` ``[b, h_q, S, d]``, ``key`` / ``value`` ``[b, h_kv, S, d]`` (post-RoPE, one causal sequence per
    row), ``o_proj_weight`` ``[D, h_q*d]``.
    """
    b, hq, s, d = query.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
    q, k, v = query.float(), key.float(), value.float()
    logits = q @ _expand(k, hq).mT * scaling
    stored_k = _store(k, key_pair, key_bits, group_size)
    q_used = q if key_pair is None else project_queries(q, key_pair)
    approx = q_used @ _expand(stored_k, hq).mT * scaling
    diff = (logits - approx)[..., causal]
    ref = logits[..., causal]

    def output(lg: Tensor, vals: Tensor, up: Tensor | None) -> Tensor:
        probs = torch.softmax(lg.masked_fill(~causal, float("-inf")), dim=-1)
        heads = probs @ _expand(vals, hq)  # [b, h_q, S, r_v]
        if up is not None:
            heads = heads @ _expand(up.to(heads.dtype)[None], hq)[0].mT  # back to d dims per head
        return heads.transpose(1, 2).reshape(b, s, hq * d) @ o_proj_weight.float().mT

    out = output(logits, v, None)
    stored_v = _store(v, value_pair, value_bits, group_size)
    out_hat = output(approx, stored_v, None if value_pair is None else value_pair.b)
    return {
        "logit_err": float(diff.double().square().sum()),
        "logit_ref": float(ref.double().square().sum()),
        "output_err": float((out - out_hat).double().square().sum()),
        "output_ref": float(out.double().square().sum()),
    }


@torch.no_grad()
def evaluate_fidelity(
    model, blocks: Tensor, variants: Sequence[FidelityVariant], progress: bool = False
) -> list[dict[str, Any]]:
    """One row per (variant, layer): ``logit_error``, ``output_error`` (relative, pooled over ``blocks``
    ``[n, S]``), the ranks and bits used. All variants are measured in the same forwards."""
    if not variants:
        raise ValueError("variants must not be empty")
    num_layers = model.config.num_hidden_layers
    for var in variants:
        for side, pairs in (("keys", var.keys), ("values", var.values)):
            if pairs is not None and len(pairs) != num_layers:
                raise ValueError(f"variant {var.name!r}: {side} has {len(pairs)} layers, the model has {num_layers}")
    sums = [[dict.fromkeys(("logit_err", "logit_ref", "output_err", "output_ref"), 0.0) for _ in range(num_layers)]
            for _ in variants]

    def observer(module, query, key, value, attention_mask):
        layer = module.layer_idx
        for acc, var in zip(sums, variants):
            key_pair, value_pair, key_bits, value_bits = var.at(layer)
            got = layer_errors(query, key, value, module.o_proj.weight, module.scaling, key_pair, value_pair,
                               key_bits, value_bits, var.group_size)
            for name, x in got.items():
                acc[layer][name] += x
        return None

    with observe_attention(model, observer):
        for block in tqdm(blocks, desc="fidelity", unit="block", disable=not progress):
            model.model(input_ids=block[None])
    rows = []
    for acc, var in zip(sums, variants):
        for layer in range(num_layers):
            key_pair, value_pair, key_bits, value_bits = var.at(layer)
            a = acc[layer]
            rows.append({
                "variant": var.name,
                "layer": layer,
                "key_rank": None if key_pair is None else key_pair.rank,
                "value_rank": None if value_pair is None else value_pair.rank,
                "key_bits": key_bits,
                "value_bits": value_bits,
                "logit_error": (a["logit_err"] / a["logit_ref"]) ** 0.5,
                "output_error": (a["output_err"] / a["output_ref"]) ** 0.5,
            })
    return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: mean over layers and the worst layer of both errors."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        worst_logit = max(mine, key=lambda r: r["logit_error"])
        worst_out = max(mine, key=lambda r: r["output_error"])
        out.append({
            "variant": name,
            "logit_error_mean": sum(r["logit_error"] for r in mine) / len(mine),
            "logit_error_worst": worst_logit["logit_error"],
            "logit_worst_layer": worst_logit["layer"],
            "output_error_mean": sum(r["output_error"] for r in mine) / len(mine),
            "output_error_worst": worst_out["output_error"],
            "output_worst_layer": worst_out["layer"],
        })
    return out


# ---------------------------------------------------------------------------------------------------- CLI
def add_fidelity_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``fidelity`` to the ``kvtrain eval`` suites."""
    p = subparsers.add_parser("fidelity", help="per-layer relative error of attention logits and outputs")
    p.add_argument("--model", default="smollm2-135m")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--artifacts", type=Path, help="a `kvtrain calibrate` output folder")
    source.add_argument("--method", choices=METHODS, help="fit this method on --calib-data first")
    p.add_argument("--rank", type=positive_int, help="key rank (with --method; truncates artifacts' projections)")
    p.add_argument("--value-rank", type=positive_int, help="value rank (default: --rank)")
    p.add_argument("--no-lowrank-values", dest="lowrank_values", action="store_false",
                   help="keep values full rank")
    p.add_argument("--calib-data", default=None)
    p.add_argument("--calib-split", default="train")
    p.add_argument("--calib-blocks", type=positive_int, default=16)
    p.add_argument("--data", default=None, help="held-out text ('embedded' default)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--blocks", type=positive_int, default=4)
    p.add_argument("--block-len", type=positive_int, default=512)
    p.add_argument("--key-bits", type=int, choices=(2, 4, 8))
    p.add_argument("--value-bits", type=int, choices=(2, 4, 8))
    p.add_argument("--group-size", type=positive_int, help="TaDA group (default: one group per stored head vector)")
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    p.set_defaults(func=cmd_eval_fidelity)
    return p


def _variant_from_args(args: argparse.Namespace, model, tokenizer) -> FidelityVariant:
    keys = values = None
    name = "tada" if args.key_bits or args.value_bits else "full"
    if args.artifacts is not None:
        projections = load_artifacts(args.artifacts, model).projections
        if projections is None:
            raise ValueError(f"{args.artifacts}: has no projections (calibrate with --fit kqsvd)")
        keys, values = projections.keys, projections.values
        if args.rank is not None:
            keys = [p.truncate(min(args.rank, p.rank)) for p in keys]
        if args.value_rank is not None:
            values = [p.truncate(min(args.value_rank, p.rank)) for p in values]
        name = f"{projections.method} (artifacts)"
    elif args.method is not None:
        calib = token_blocks(tokenizer, load_texts(args.calib_data, args.calib_split), args.block_len, args.calib_blocks)
        stats = collect_statistics(model, calib, ("grams",), progress=True)
        layers = model.config.num_hidden_layers
        projections = fit_projections(stats.grams, stats.values, o_proj_weights(model), args.method,
                                      [args.rank] * layers, [args.value_rank or args.rank] * layers)
        keys, values = projections.keys, projections.values
        name = f"{args.method} r={args.rank}"
    if not args.lowrank_values:
        values = None
    return FidelityVariant(name, keys, values, args.key_bits, args.value_bits, args.group_size)


def _check_variant_args(args: argparse.Namespace) -> None:
    """What `_variant_from_args` needs, checked before the weights load."""
    if args.artifacts is not None:
        artifact_folder(args.artifacts)
    elif args.method is not None:
        if args.rank is None:
            raise ValueError("--method needs --rank")
    elif not (args.key_bits or args.value_bits):
        raise ValueError("give --artifacts, --method with --rank, or --key-bits/--value-bits")


def cmd_eval_fidelity(args: argparse.Namespace) -> None:
    if args.out:
        check_writable(args.out, "--out", folder=False)
    _check_variant_args(args)
    _, config = load_config(args.model)
    check_sequence(config, args.block_len, "--block-len")
    model, tokenizer = load_model(args.model)
    variant = _variant_from_args(args, model, tokenizer)
    blocks = token_blocks(tokenizer, load_texts(args.data, args.split), args.block_len, args.blocks)
    rows = evaluate_fidelity(model, blocks, [variant], progress=True)
    print_table(rows, title=f"attention fidelity ({args.blocks} x {args.block_len} held-out tokens)")
    print_table(summarise(rows), title="summary over layers")
    if args.out:
        atomic_write_text(args.out, json.dumps({"model": args.model, "rows": rows, "summary": summarise(rows)},
                                               indent=2))
        print(f"wrote {args.out}")
