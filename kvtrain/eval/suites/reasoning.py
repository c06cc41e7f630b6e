"""Reasoning under decode-time compression: long derivations a small model can carry out, checked by program.

* chains: "Start at 7 and add 2, 8 times." answered as "7 + 2 = 9. 9 + 2 = 11. ... The answer is 23.": every
  step is checkable, so besides the final answer (`math_answer`, via `math-verify`) we score how many steps
  stay right before the first slip (`chain_steps`). Long answers (up to ~100 tokens) go through the cache's
  decode-time compression events on the configured schedule;
* word problems in GSM8K style (one or two operations on small numbers), answered "... The answer is N.".

Both are few-shot (two worked examples) in plain text; the numbers are seeded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvtrain.eval import metrics as M
from kvtrain.eval.generation import run_items
from kvtrain.eval.items import Check, EvalItem
from kvtrain.eval.suites.base import Suite, SuiteResult
from kvtrain.typecheck import check_fields, limits

CHAIN_SHOTS = ("Q: Start at 4 and add 3, 5 times.\n"
               "A: 4 + 3 = 7. 7 + 3 = 10. 10 + 3 = 13. 13 + 3 = 16. 16 + 3 = 19. The answer is 19.\n\n"
               "Q: Start at 2 and add 5, 4 times.\n"
               "A: 2 + 5 = 7. 7 + 5 = 12. 12 + 5 = 17. 17 + 5 = 22. The answer is 22.\n\n")
WORD_SHOTS = ("Q: Tom has 3 apples and buys 4 more. How many apples does he have?\n"
              "A: 3 + 4 = 7. The answer is 7.\n\n"
              "Q: A box holds 5 pens. Ana has 2 boxes and gives away 3 pens. How many pens does she have?\n"
              "A: 5 * 2 = 10. 10 - 3 = 7. The answer is 7.\n\n")
NAMES = ("Sam", "Tom", "Lee", "Max", "Ben", "Dan")
THINGS = ("books", "cards", "shells", "stamps", "coins", "marbles")
STOP = ["\nQ:", "\n\n"]


@dataclass
class ReasoningOptions:
    chains: int = field(default=4, metadata=limits(minimum=0))
    word_problems: int = field(default=3, metadata=limits(minimum=0))
    # a cap on the answer length (default: enough for every derivation)
    max_new_tokens: int | None = field(default=None, metadata=limits(minimum=1))
    seed: int = 0
    batch_size: int = field(default=8, metadata=limits(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.chains + self.word_problems < 1:
            raise ValueError("chains + word_problems must be at least 1: there would be no item to evaluate")


def _chain(rng: random.Random, index: int) -> EvalItem:
    start, step, times = rng.randint(1, 9), rng.choice((1, 2, 3, 5)), rng.randint(6, 9)
    values = [start + step * k for k in range(times + 1)]
    derivation = " ".join(f"{a} + {step} = {b}." for a, b in zip(values, values[1:]))
    return EvalItem(
        id=f"chain-{index}", suite="reasoning",
        pieces=[("shots", CHAIN_SHOTS), ("question", f"Q: Start at {start} and add {step}, {times} times.\nA:")],
        prefill_pieces=2,
        checks=[Check("answer", "math_answer", str(values[-1])), Check("steps", "chain_steps", derivation)],
        max_new_tokens=12 * times + 12, stop=STOP, meta={"kind": "chain", "times": times},
    )


def _word_problem(rng: random.Random, index: int) -> EvalItem:
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    # The three forms have the same token count with single-token names and things (SmolLM2), so they batch.
    form = index % 3
    if form == 0:
        text, answer = f"{name} has {a} {things} and then gets {b} more. How many {things} does {name} have now?", a + b
    elif form == 1:
        text, answer = f"A bag holds {a} {things}. {name} has {b} bags. How many {things} does he have?", a * b
    else:
        c = rng.randint(1, a + b - 1)
        text = f"{name} has {a} {things}, finds {b} more and loses {c}. How many {things} remain?"
        answer = a + b - c
    return EvalItem(
        id=f"word-{index}", suite="reasoning", pieces=[("shots", WORD_SHOTS), ("question", f"Q: {text}\nA:")],
        prefill_pieces=2, checks=[Check("answer", "math_answer", str(answer))], max_new_tokens=40, stop=STOP,
        meta={"kind": "word"},
    )


class ReasoningSuite(Suite):
    name = "reasoning"
    Options = ReasoningOptions
    in_overall = True
    quality_metric = "accuracy"
    has_items = True
    quality_checks = ("answer",)

    def build_items(self, tokenizer, options: ReasoningOptions) -> list[EvalItem]:
        rng = random.Random(f"{options.seed}:reasoning")
        items = [_chain(rng, i) for i in range(options.chains)] + [_word_problem(rng, i)
                                                                     for i in range(options.word_problems)]
        if options.max_new_tokens is not None:
            for item in items:
                item.max_new_tokens = min(item.max_new_tokens, options.max_new_tokens)
        return items

    def run(self, model, tokenizer, config, options: ReasoningOptions, *, progress: bool = False) -> SuiteResult:

        items = self.build_items(tokenizer, options)
        runs = run_items(model, tokenizer, items, config, batch_size=options.batch_size, progress=progress,
                         desc="reasoning")
        rows = [{"id": item.id, "response": run.response,
                 "scores": {check.name: check.score(run.response) for check in item.checks}, "meta": item.meta}
                for item, run in zip(items, runs)]
        metrics = {"accuracy": M.mean(r["scores"]["answer"] for r in rows),
                   "cache_fraction": M.mean(run.bytes.fraction for run in runs)}
        chains = [r for r in rows if r["meta"]["kind"] == "chain"]
        words = [r for r in rows if r["meta"]["kind"] == "word"]
        if chains:
            metrics["chain_accuracy"] = M.mean(r["scores"]["answer"] for r in chains)
            metrics["chain_steps"] = M.mean(r["scores"]["steps"] for r in chains)
        if words:
            metrics["word_accuracy"] = M.mean(r["scores"]["answer"] for r in words)
        return SuiteResult(metrics=metrics, items=rows)
