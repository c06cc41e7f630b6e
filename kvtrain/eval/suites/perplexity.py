"""Perplexity of held-out text under compression, with the loyalty metrics of the same tokens.

Each held-out block is a context (prefilled, compressed) and a continuation scored token by token as it would
be decoded, compression events included (`kvtrain.eval.loyalty.evaluate_loyalty`). Reported: the perplexity of
the real continuation under the compressed cache and under the full cache, KL(full || compressed) and top-1
agreement with the full cache, each with a 95% percentile-bootstrap interval over blocks (of the mean NLL, reported
as perplexity; and of the KL). By default 6 blocks x 128 continuation tokens (768 scored tokens): the embedded
held-out text that shares no 13-word run with the training split holds ~3,100 SmolLM2 tokens, six 512-token
blocks; more would need more held-out text than the embedded corpus has. `perplexity` computes the logits by replay
(one forward, equal to step-by-step decoding by the parity tests); `loyalty` decodes through the cache step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvtrain.data import token_blocks
from kvtrain.eval import metrics as M
from kvtrain.eval.heldout import heldout_paragraphs
from kvtrain.eval.intervals import bootstrap_mean
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.eval.suites.base import Suite, SuiteResult
from kvtrain.typecheck import check_fields, limits


@dataclass
class PerplexityOptions:
    blocks: int = field(default=6, metadata=limits(minimum=1))  # all the filtered embedded held-out text holds
    context_len: int = field(default=384, metadata=limits(minimum=1))
    continuation_len: int = field(default=128, metadata=limits(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self)


def heldout_blocks(tokenizer, n_blocks: int, block_len: int):

    return token_blocks(tokenizer, list(heldout_paragraphs()), block_len, n_blocks)


class PerplexitySuite(Suite):
    name = "perplexity"
    Options = PerplexityOptions
    in_overall = True
    quality_metric = "perplexity"
    quality_lower_is_better = True
    method = "replay"

    def longest_sequence(self, options: PerplexityOptions) -> tuple[int, str]:
        return options.context_len + options.continuation_len, "context_len + continuation_len"

    def run(self, model, tokenizer, config, options: PerplexityOptions, *, progress: bool = False) -> SuiteResult:
        import torch


        blocks = heldout_blocks(tokenizer, options.blocks, options.context_len + options.continuation_len)
        if config is None:  # the full cache: NLL of the continuation, nothing to be loyal to
            with torch.no_grad():
                logits = model(input_ids=blocks).logits[:, options.context_len - 1 : -1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), blocks[:, options.context_len:],
                                                    reduction="none").mean(1)
            per_block = [{"nll": M.finite(v, "NLL"), "nll_full": v, "kl": 0.0, "top1": 1.0} for v in nll.tolist()]
        else:
            per_block = []
            for block in blocks:  # one block at a time: the interval is over blocks (same work as all at once)
                (result,) = evaluate_loyalty(model, [config], block[None], context_len=options.context_len,
                                             method=self.method, progress=False)
                per_block.append({"nll": result.nll_compressed, "nll_full": result.nll_full,
                                  "kl": result.kl_full_to_compressed, "top1": result.top1_agreement})
        return _block_result(per_block, options.continuation_len)


def _block_result(per_block: list[dict[str, float]], continuation_len: int) -> SuiteResult:
    """Means over blocks (every block scores the same number of tokens) and 95% bootstrap intervals over them."""
    def column(name: str) -> list[float]:
        return [M.finite(row[name], f"{name} of a block") for row in per_block]

    nll, kl = column("nll"), column("kl")
    low, high = bootstrap_mean(nll)
    kl_low, kl_high = bootstrap_mean(kl)
    return SuiteResult(metrics={
        "perplexity": math.exp(M.mean(nll)), "perplexity_ci95_low": math.exp(low), "perplexity_ci95_high": math.exp(high),
        "perplexity_full": math.exp(M.mean(column("nll_full"))),
        "kl": M.mean(kl), "kl_ci95_low": kl_low, "kl_ci95_high": kl_high,
        "top1_agreement": M.mean(column("top1")),
        "scored_tokens": float(len(per_block) * continuation_len),
    }, extra={"per_block": per_block, "interval": "percentile bootstrap over blocks"})


class LoyaltySuite(PerplexitySuite):
    name = "loyalty"
    method = "cache"
