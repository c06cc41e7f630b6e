"""RULER-shaped suite: needles, variable tracking and word extraction over held-out text (`kvtrain.eval.ruler_tasks`).

`n` items per (task, length), seeded and distinct. Two settings, as kvpress reports RULER:

* `question: after` (default): the context is prefilled and compressed as a cached document; the question and
  the answer cue are fed after it, so the compression cannot see the question;
* `question: inside`: the question is part of the compressed prompt; only the answer cue follows.

Scoring is RULER's string match (checker `all_present`: every expected value in the response). Per task and
length: accuracy and its 95% Wilson interval; with the full cache's result (`task_table`), its accuracy, and
tasks where the full cache scores below `DIAGNOSTIC_BELOW` are diagnostic, left out of the headline mean.
Each item's context is fitted to exactly `length` tokens of prompt where the tokenizer allows, so the items of
a (task, length) share a token layout and run as one batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvtrain.eval import metrics as M
from kvtrain.eval import ruler_tasks as T
from kvtrain.eval.generation import run_items
from kvtrain.eval.heldout import check_not_in_training
from kvtrain.eval.intervals import wilson
from kvtrain.eval.items import Check, EvalItem
from kvtrain.eval.suites.base import Suite, SuiteResult

SETTINGS = ("after", "inside")
DIAGNOSTIC_BELOW = 0.3  # full-cache accuracy under which a task says nothing about compression
NIAH_PREAMBLE = "Hidden codes are placed in the following text. Memorise them.\n"
VT_PREAMBLE = "Variables are set in the following text.\n"
MAX_NEW_TOKENS = {"niah_number": 12, "niah_word": 8, "niah_uuid": 32, "niah_multikey": 12, "niah_multivalue": 48,
                  "niah_multiquery": 48, "variable_tracking": 32, "common_words": 32, "frequent_words": 20}


@dataclass
class RulerOptions:
    tasks: tuple[str, ...] = T.TASKS
    lengths: tuple[int, ...] = (1024, 2048, 4096)  # tokens of the whole prompt; above the model's positions: skipped
    n: int = 100  # items per (task, length)
    question: str = "after"
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in T.TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks {list(self.tasks)}: choose from {list(T.TASKS)}")
        if self.question not in SETTINGS:
            raise ValueError(f"question {self.question!r}: choose from {list(SETTINGS)}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"n={self.n} and batch_size={self.batch_size} must be >= 1")
        if not self.lengths or any(length < 256 for length in self.lengths):
            raise ValueError(f"lengths {list(self.lengths)} must be >= 256 tokens")


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _exact(tokenizer, make, n: int, budget: int, tail: str) -> str:
    """`make(n)` (at most `budget` tokens) grown by a prefix of the next filler word `tail` to exactly `budget`
    tokens if one does, else `make(n)` as it is (the item is valid; it only runs outside its batch)."""
    text = make(n)
    for k in range(1, len(tail) + 1):
        longer = text + " " + tail[:k]
        have = _count(tokenizer, longer)
        if have == budget:
            return longer
        if have > budget:
            break
    return text


def _task(tokenizer, task: str, rng: random.Random, length: int, vocab) -> T.Task:
    """The task with its context fitted so that context, question and cue take at most (for the haystack
    tasks, where the tokenizer allows, exactly) `length` tokens."""
    if task in ("common_words", "frequent_words"):
        build = T.common_words if task == "common_words" else T.frequent_words
        seed = rng.random()
        empty = build(random.Random(seed), vocab, 0)
        budget = length - _tail(tokenizer, empty)
        most = len(vocab) - T.COMMON_WORDS if task == "common_words" else budget
        n = T.fit_words(lambda k: _count(tokenizer, build(random.Random(seed), vocab, k).context), most, budget)
        return build(random.Random(seed), vocab, n)
    made = T.niah(task, rng, vocab) if task.startswith("niah") else T.variable_tracking(rng)
    budget = length - _tail(tokenizer, made)
    words = T.filler_words()
    offset = rng.randrange(len(words))
    words = words[offset:] + words[:offset]
    preamble = NIAH_PREAMBLE if task.startswith("niah") else VT_PREAMBLE

    def make(n: int) -> str:
        return preamble + T.place(list(words[:n]), made.needles, made.depths)

    n = T.fit_words(lambda k: _count(tokenizer, make(k)), budget, budget)
    made.context = _exact(tokenizer, make, n, budget, words[n])
    return made


def _pieces(task: T.Task) -> list[tuple[str, str]]:
    return [("context", task.context), ("question", "\n\n" + task.question), ("answer", "\nAnswer: " + task.cue)]


def _tail(tokenizer, task: T.Task) -> int:
    """Tokens of the question and answer cue pieces."""
    return sum(_count(tokenizer, text) for _, text in _pieces(task)[1:])


def _item(tokenizer, task: str, length: int, index: int, options: RulerOptions, vocab, attempt: int) -> EvalItem:
    made = _task(tokenizer, task, random.Random(f"{options.seed}:{task}:{length}:{index}:{attempt}"), length, vocab)
    return EvalItem(
        id=f"{task}-L{length}-{index}", suite="ruler", pieces=_pieces(made),
        prefill_pieces=1 if options.question == "after" else 2,
        checks=[Check("answer", "all_present", "|".join(made.answers))], max_new_tokens=MAX_NEW_TOKENS[task],
        stop=["\n"], meta={"task": task, "length": length, "depths": [round(d, 4) for d in made.depths]},
    )


def build_ruler_items(tokenizer, options: RulerOptions) -> list[EvalItem]:
    """`n` distinct items per (task, length): an item whose prompt repeats an earlier one is drawn again."""
    vocab = T.vocabulary(tokenizer)
    items, prompts = [], set()
    for task in options.tasks:
        for length in options.lengths:
            for index in range(options.n):
                for attempt in range(100):
                    item = _item(tokenizer, task, length, index, options, vocab, attempt)
                    if item.prompt not in prompts:
                        break
                else:
                    raise ValueError(f"ruler: no new {task} item of {length} tokens after 100 draws")
                prompts.add(item.prompt)
                items.append(item)
    check_not_in_training([item.pieces[0][1] for item in items], "ruler context")
    return items


def task_table(result: SuiteResult, full: SuiteResult | None) -> list[dict]:
    """Per (task, length): items, accuracy with its 95% Wilson interval, the full cache's accuracy, and whether
    the task is diagnostic (full cache below DIAGNOSTIC_BELOW, outside the headline mean)."""
    full_by_id = {row["id"]: row["scores"]["answer"] for row in full.items} if full is not None else {}
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in result.items:
        groups.setdefault((row["meta"]["task"], row["meta"]["length"]), []).append(row)
    table = []
    for (task, length), rows in groups.items():
        passed = int(sum(row["scores"]["answer"] for row in rows))
        low, high = wilson(passed, len(rows))
        entry = {"task": task, "length": length, "n": len(rows), "accuracy": passed / len(rows),
                 "ci95_low": low, "ci95_high": high}
        if full is not None:
            entry["full_accuracy"] = M.mean(full_by_id[row["id"]] for row in rows)
            entry["diagnostic"] = entry["full_accuracy"] < DIAGNOSTIC_BELOW
        table.append(entry)
    return table


def headline(table: list[dict]) -> float | None:
    """Mean accuracy over the (task, length) rows that are not diagnostic (None when all are)."""
    kept = [row["accuracy"] for row in table if not row.get("diagnostic", False)]
    return sum(kept) / len(kept) if kept else None


class RulerSuite(Suite):
    name = "ruler"
    Options = RulerOptions
    in_overall = True
    quality_metric = "accuracy"
    has_items = True
    quality_checks = ("answer",)

    def build_items(self, tokenizer, options: RulerOptions) -> list[EvalItem]:
        return build_ruler_items(tokenizer, options)

    def breakdown(self, result: SuiteResult, full: SuiteResult | None) -> list[dict]:
        table = task_table(result, full)
        return table + [{"task": "headline (non-diagnostic)", "accuracy": headline(table)}]

    def run(self, model, tokenizer, config, options: RulerOptions, *, progress: bool = False) -> SuiteResult:
        limit = model.config.max_position_embeddings
        skipped = [length for length in options.lengths if length + max(MAX_NEW_TOKENS.values()) > limit]
        lengths = tuple(length for length in options.lengths if length not in skipped)
        if not lengths:
            return SuiteResult(skipped=f"every length {list(options.lengths)} exceeds the model's {limit} positions")
        options = RulerOptions(**{**vars(options), "lengths": lengths})
        items = self.build_items(tokenizer, options)
        runs = run_items(model, tokenizer, items, config, batch_size=options.batch_size, progress=progress,
                         desc="ruler")
        rows = [{"id": item.id, "response": run.response, "scores": {"answer": item.checks[0].score(run.response)},
                 "meta": item.meta} for item, run in zip(items, runs)]
        result = SuiteResult(items=rows, extra={"skipped_lengths": skipped, "question": options.question})
        scores = [row["scores"]["answer"] for row in rows]
        low, high = wilson(int(sum(scores)), len(scores))
        result.metrics = {"accuracy": M.mean(scores), "accuracy_ci95_low": low, "accuracy_ci95_high": high,
                          "cache_fraction": M.mean(run.bytes.fraction for run in runs)}
        for entry in task_table(result, None):
            key = f"{entry['task']}_L{entry['length']}"
            result.metrics.update({f"accuracy_{key}": entry["accuracy"], f"ci95_low_{key}": entry["ci95_low"],
                                   f"ci95_high_{key}": entry["ci95_high"]})
        result.__post_init__()  # the metrics are checked finite like any result's
        return result
