"""Retrieval: a passkey or a needle hidden at several depths of held-out text, and a verbatim copy task.

* passkey: "The pass key is 48213. Remember it. 48213 is the pass key." inside the haystack; after the
  haystack the cue "The pass key is" follows and the first number of the answer must be the key;
* needle: "The secret ingredient of the soup is saffron." with the cue "The secret ingredient of the soup
  is"; the first word of the answer must be the ingredient;
* copy: a sentence of the haystack is started again after it (its first words) and the model must continue
  it verbatim (next words), which even a small model does with a full cache.

The haystack (all but the cue) is prefilled and compressed; the cue is fed after it, token by token, so the
compression does not know the question (as with a document cached before the user asks). Plain text, no chat
template: the small instruct model retrieves from raw text, not from a chat turn. Haystacks are held-out
paragraphs (`kvtrain.eval.heldout`), cut to `length` tokens; needles and keys are seeded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvtrain.eval import metrics as M
from kvtrain.eval.generation import run_items
from kvtrain.eval.heldout import check_not_in_training, heldout_paragraphs
from kvtrain.eval.items import Check, EvalItem
from kvtrain.eval.ruler_tasks import fit_words
from kvtrain.eval.suites.base import Suite, SuiteResult
from kvtrain.typecheck import check_fields, limits

KINDS = ("passkey", "needle", "copy")
INGREDIENTS = ("saffron", "cinnamon", "ginger", "nutmeg", "oregano", "paprika", "vanilla", "rosemary", "basil",
               "cardamom", "thyme", "turmeric")
COPY_CUE_TOKENS = 8  # "\n\n" and the first words of the sentence
COPY_MAX_CUE_WORDS = 7
COPY_ANSWER_WORDS = 8
# Tokens generated after the cue: the first words of a key or ingredient, and a copied sentence's next words.
ANSWER_TOKENS = 8
COPY_TOKENS = 20


@dataclass
class RetrievalOptions:
    # tokens of the whole prompt
    lengths: tuple[int, ...] = field(default=(256, 512), metadata=limits(minimum=64, nonempty=True))
    # where the needle (or copied sentence) sits in the haystack
    depths: tuple[float, ...] = field(default=(0.1, 0.5, 0.9), metadata=limits(minimum=0.0, maximum=1.0, nonempty=True))
    kinds: tuple[str, ...] = field(default=KINDS, metadata=limits(choices=KINDS, nonempty=True))
    seed: int = 0
    batch_size: int = field(default=8, metadata=limits(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self)


def _filler_words(offset: int) -> list[str]:

    words = " ".join(heldout_paragraphs()).split()
    offset %= len(words)
    return words[offset:] + words[:offset]


def _fit_words(tokenizer, words: list[str], build, target: int) -> int:
    """The most filler words n such that `build(n)` (a text) is at most `target` tokens (binary search)."""
    def count(n: int) -> int:
        return len(tokenizer(build(n), add_special_tokens=False)["input_ids"])

    return fit_words(count, len(words), target, "retrieval")


def _needle_item(tokenizer, kind: str, length: int, depth: float, index: int, seed: int) -> EvalItem:
    rng = random.Random(f"{seed}:{kind}:{length}:{depth}:{index}")
    if kind == "passkey":
        answer = str(rng.randint(10000, 99999))
        needle, cue, checker = f"The pass key is {answer}. Remember it. {answer} is the pass key.", \
            "\n\nThe pass key is", "first_number"
    else:
        answer = rng.choice(INGREDIENTS)
        needle, cue, checker = f"The secret ingredient of the soup is {answer}.", \
            "\n\nThe secret ingredient of the soup is", "first_word"
    words = _filler_words(offset=length)  # one haystack per length: depths differ only by the needle's place
    cue_tokens = len(tokenizer(cue, add_special_tokens=False)["input_ids"])

    def build(n: int) -> str:
        at = round(depth * n)
        return " ".join(words[:at] + [needle] + words[at:n])

    n = _fit_words(tokenizer, words, build, length - cue_tokens)
    return EvalItem(
        id=f"{kind}-L{length}-d{depth:g}", suite="retrieval",
        pieces=[("haystack", build(n)), ("cue", cue)], prefill_pieces=1,
        checks=[Check("answer", checker, answer)], max_new_tokens=ANSWER_TOKENS, stop=["\n"],
        meta={"kind": kind, "length": length, "depth": depth},
    )


def _copy_items(tokenizer, length: int, depths: tuple[float, ...], seed: int) -> list[EvalItem]:
    """One haystack per length; per depth, the sentence starting nearest that depth whose first words make a
    cue of exactly COPY_CUE_TOKENS tokens (so the items of a length share a token layout and a batch)."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def cue_at(words: list[str], start: int) -> str | None:
        for k in range(1, COPY_CUE_TOKENS + 1):
            cue = "\n\n" + " ".join(words[start : start + k])
            if count(cue) >= COPY_CUE_TOKENS:
                return cue if count(cue) == COPY_CUE_TOKENS else None
        return None

    # Some stretches of the held-out text are code without sentences: move on until sentences fit.
    for attempt in range(50):
        words = _filler_words(offset=7919 + length + seed + 131 * attempt)
        n = _fit_words(tokenizer, words, lambda k, w=words: " ".join(w[:k]), length - COPY_CUE_TOKENS)
        # sentence starts (after a word ending in '.') with the cue and the answer inside the haystack
        starts = [i for i in range(1, n - COPY_MAX_CUE_WORDS - COPY_ANSWER_WORDS + 1) if words[i - 1].endswith(".")]
        cues = {i: cue for i in starts if (cue := cue_at(words, i)) is not None}
        if cues:
            break
    else:
        raise ValueError(f"retrieval copy: no sentence fits in a {length}-token haystack")
    items = []
    for depth in depths:
        start = min(cues, key=lambda i: abs(i / n - depth))
        cue = cues[start]
        after = start + len(cue.split())
        items.append(EvalItem(
            id=f"copy-L{length}-d{depth:g}", suite="retrieval",
            pieces=[("haystack", " ".join(words[:n])), ("cue", cue)], prefill_pieces=1,
            checks=[Check("answer", "verbatim_prefix", " ".join(words[after : after + COPY_ANSWER_WORDS]))],
            max_new_tokens=COPY_TOKENS, stop=["\n"], meta={"kind": "copy", "length": length, "depth": round(start / n, 3)},
        ))
    return items


class RetrievalSuite(Suite):
    name = "retrieval"
    Options = RetrievalOptions
    in_overall = True
    quality_metric = "accuracy"
    has_items = True
    quality_checks = ("answer",)

    def build_items(self, tokenizer, options: RetrievalOptions) -> list[EvalItem]:

        items = []
        for kind in options.kinds:
            for length in options.lengths:
                if kind == "copy":
                    items += _copy_items(tokenizer, length, options.depths, options.seed)
                    continue
                for i, depth in enumerate(options.depths):
                    items.append(_needle_item(tokenizer, kind, length, depth, i, options.seed))
        check_not_in_training([item.pieces[0][1] for item in items], "retrieval haystack")
        return items

    def longest_sequence(self, options: RetrievalOptions) -> tuple[int, str]:
        answer = max(ANSWER_TOKENS, COPY_TOKENS)
        return max(options.lengths) + answer, f"max(lengths) + {answer} answer tokens"

    def run(self, model, tokenizer, config, options: RetrievalOptions, *, progress: bool = False) -> SuiteResult:

        items = self.build_items(tokenizer, options)
        runs = run_items(model, tokenizer, items, config, batch_size=options.batch_size, progress=progress,
                         desc="retrieval")
        rows = [{"id": item.id, "response": run.response, "scores": {"answer": item.checks[0].score(run.response)},
                 "meta": item.meta} for item, run in zip(items, runs)]
        metrics = {"accuracy": M.mean(r["scores"]["answer"] for r in rows),
                   "cache_fraction": M.mean(run.bytes.fraction for run in runs)}
        for key, values in (("kind", options.kinds), ("length", options.lengths)):
            for value in values:
                group = [r["scores"]["answer"] for r in rows if r["meta"][key] == value]
                metrics[f"accuracy_{value}" if key == "kind" else f"accuracy_L{value}"] = M.mean(group)
        return SuiteResult(metrics=metrics, items=rows)
