"""Perplexity of held-out text under compression, with the loyalty metrics of the same tokens.

Each held-out block is a context (prefilled, compressed) and a continuation scored token by token as it would
be decoded, compression events included (`kvtrain.eval.loyalty.evaluate_loyalty`). Reported: the perplexity of
the real continuation under the compressed cache and under the full cache, KL(full || compressed) and top-1
agreement with the full cache. `perplexity` computes the compressed logits by replay (one forward, equal to
step-by-step decoding by the parity tests); `loyalty` decodes through the cache step by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvtrain.data import token_blocks
from kvtrain.eval import metrics as M
from kvtrain.eval.heldout import heldout_paragraphs
from kvtrain.eval.loyalty import evaluate_loyalty
from kvtrain.eval.suites.base import Suite, SuiteResult
from kvtrain.typecheck import check_fields, limits


@dataclass
class PerplexityOptions:
    blocks: int = field(default=2, metadata=limits(minimum=1))
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
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, options.context_len:].flatten())
            ppl = math.exp(M.finite(nll.item(), "NLL"))
            return SuiteResult(metrics={"perplexity": ppl, "perplexity_full": ppl, "kl": 0.0, "top1_agreement": 1.0})
        (result,) = evaluate_loyalty(model, [config], blocks, context_len=options.context_len, method=self.method,
                                     progress=progress)
        return SuiteResult(metrics={
            "perplexity": math.exp(M.finite(result.nll_compressed, "NLL under compression")),
            "perplexity_full": math.exp(M.finite(result.nll_full, "NLL with the full cache")),
            "kl": result.kl_full_to_compressed,
            "top1_agreement": result.top1_agreement,
        })


class LoyaltySuite(PerplexitySuite):
    name = "loyalty"
    method = "cache"
