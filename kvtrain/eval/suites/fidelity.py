"""Per-layer attention fidelity of a configuration's low-rank and/or quantised storage (no eviction).

Each layer's own queries, keys and values of a plain forward over held-out text are compared with what the
configuration's storage gives (`kvtrain.eval.fidelity`): relative errors of the attention logits and of the
attention output, per layer. Configurations that only evict tokens have nothing to measure here (skipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtrain.eval import metrics as M
from kvtrain.eval.fidelity import FidelityVariant, evaluate_fidelity
from kvtrain.eval.suites.base import Suite, SuiteResult
from kvtrain.eval.suites.perplexity import heldout_blocks
from kvtrain.runtime.codecs import ChainCodec, LowRankCodec, TadaCodec
from kvtrain.runtime.compressor import layer_codecs
from kvtrain.typecheck import check_fields, limits


@dataclass
class FidelityOptions:
    blocks: int = field(default=2, metadata=limits(minimum=1))
    block_len: int = field(default=256, metadata=limits(minimum=2))

    def __post_init__(self) -> None:
        check_fields(self)


def _parts(codec):
    """(low-rank pair or None, TaDA codec or None) of one side's codec."""
    if isinstance(codec, ChainCodec):
        return codec.inner.pair, codec.outer
    return (codec.pair if isinstance(codec, LowRankCodec) else None), (codec if isinstance(codec, TadaCodec) else None)


def fidelity_variant(config, model_config):
    """The configuration's per-layer storage as a `FidelityVariant` (dense layers exact), or None when it
    stores keys and values in full precision (eviction or merging only)."""

    if config is None or config.sals is not None or (config.lowrank is None and config.quant is None):
        return None
    sides = {"keys": [], "values": [], "key_bits": [], "value_bits": []}
    groups = set()
    for layer, codecs in enumerate(layer_codecs(config, model_config)):
        dense = layer in config.dense_layers
        for codec, pairs, bits in ((codecs.keys, "keys", "key_bits"), (codecs.values, "values", "value_bits")):
            pair, tada = (None, None) if dense else _parts(codec)
            sides[pairs].append(pair)
            sides[bits].append(None if tada is None else tada.bits)
            if tada is not None:
                groups.add(tada.group_size)
    if len(groups) > 1:
        raise ValueError(f"fidelity: one TaDA group size expected, the configuration uses {sorted(groups)}")
    return FidelityVariant("config", sides["keys"], sides["values"], sides["key_bits"], sides["value_bits"],
                           groups.pop() if groups else None)


class FidelitySuite(Suite):
    name = "fidelity"
    Options = FidelityOptions
    quality_metric = "output_fidelity"

    def longest_sequence(self, options: FidelityOptions) -> tuple[int, str]:
        return options.block_len, "block_len"

    def run(self, model, tokenizer, config, options: FidelityOptions, *, progress: bool = False) -> SuiteResult:

        variant = fidelity_variant(config, model.config)
        if variant is None:
            return SuiteResult(skipped="keys and values are stored in full precision")
        rows = evaluate_fidelity(model, heldout_blocks(tokenizer, options.blocks, options.block_len), [variant],
                                 progress=progress)
        logit = [M.finite(r["logit_error"], f"logit error of layer {r['layer']}") for r in rows]
        output = [M.finite(r["output_error"], f"output error of layer {r['layer']}") for r in rows]
        return SuiteResult(
            metrics={"logit_error": M.mean(logit), "output_error": M.mean(output),
                     "output_error_worst": max(output), "output_fidelity": 1.0 - M.mean(output)},
            extra={"logit_error_per_layer": logit, "output_error_per_layer": output},
        )
