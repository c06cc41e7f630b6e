"""The RULER-shaped suite: generators (seeded, distinct, needles where asked, answers present), its layout on
SmolLM2's tokenizer, and a tiny-model run in both question settings."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from kvtrain.eval import ruler_tasks as T
from kvtrain.eval.generation import tokenize_pieces
from kvtrain.eval.suites import get_suite
from kvtrain.eval.suites.ruler import NIAH_PREAMBLE, RulerOptions, build_ruler_items, headline, task_table
from tests.eval.conftest import evict_config


def test_place_puts_each_needle_at_its_depth():
    words = [f"w{i}" for i in range(200)]
    text = T.place(words, ["NEEDLE-A", "NEEDLE-B"], [0.73, 0.1])
    tokens = text.split()
    assert tokens.index("NEEDLE-B") == round(0.1 * 200)  # before the word at that share of the filler
    assert tokens.index("NEEDLE-A") == round(0.73 * 200) + 1  # after B, which shifts it by one
    assert [t for t in tokens if t.startswith("w")] == words


def test_frequent_and_common_words_have_a_unique_answer():
    vocab = tuple(f"word{i}" for i in range(500))
    for seed in range(5):
        task = T.frequent_words(random.Random(seed), vocab, 300)
        counts = Counter(task.context.split("\n", 1)[1].split())
        ranked = [w for w, _ in counts.most_common()]
        assert set(ranked[: T.FREQUENT_WORDS]) == set(task.answers)
        assert counts[ranked[T.FREQUENT_WORDS - 1]] > counts[ranked[T.FREQUENT_WORDS]]
        task = T.common_words(random.Random(seed), vocab, 40)
        counts = Counter(line.split(". ", 1)[1] for line in task.context.splitlines()[1:])
        assert {w for w, c in counts.items() if c == T.COMMON_REPEAT} == set(task.answers)
        assert set(counts.values()) == {T.COMMON_REPEAT, T.RARE_REPEAT}


@pytest.mark.slow
def test_items_are_seeded_distinct_fitted_and_hold_their_answers(smollm2):
    _, tokenizer = smollm2
    options = RulerOptions(n=6, lengths=(512,), seed=3)
    items = build_ruler_items(tokenizer, options)
    assert [i.to_dict() for i in items] == [i.to_dict() for i in build_ruler_items(tokenizer, options)]
    other = build_ruler_items(tokenizer, RulerOptions(n=6, lengths=(512,), seed=4))
    assert {i.prompt for i in items}.isdisjoint(i.prompt for i in other)
    assert len({i.prompt for i in items}) == len({i.id for i in items}) == len(items) == 6 * len(T.TASKS)
    layouts = Counter()
    for item in items:
        ids, spans = tokenize_pieces(tokenizer, item)
        assert ids == tokenizer(item.prompt)["input_ids"] and len(ids) <= 512, item.id
        context, task = item.pieces[0][1], item.meta["task"]
        answers = item.checks[0].reference.split("|")
        if task.startswith("niah") or task == "variable_tracking":
            layouts[(task, spans[0][1], len(ids))] += 1
            if task != "variable_tracking":  # each needle's value once in the context, where the depth says
                for value in answers:
                    assert context.count(value) == 1, (item.id, value)
            words = context.split()
            at = [k for k, w in enumerate(words) if w.rstrip(".") in answers]
            assert at, item.id
        else:
            assert all(f" {a}" in context or f"\n{a}" in context for a in answers), item.id
        assert item.checks[0].score(" " + ", ".join(answers)) == 1.0
        assert item.checks[0].score(" " + ", ".join(answers[1:])) == 0.0  # one missing value fails
    # items of a haystack task share one token layout: one batch
    assert sorted(Counter(task for task, _, _ in layouts).values()) == [1] * 7
    assert all(count == 6 for count in layouts.values())


@pytest.mark.slow
def test_single_needle_sits_at_its_seeded_depth(smollm2):
    _, tokenizer = smollm2
    for item in build_ruler_items(tokenizer, RulerOptions(tasks=("niah_number",), n=4, lengths=(512,))):
        words = item.pieces[0][1].split()
        value = item.checks[0].reference
        start = next(k for k, w in enumerate(words) if w == f"{value}.") - 6  # "The hidden code for K is V."
        preamble = len(NIAH_PREAMBLE.split())
        # the filler holds n words, or n + 1 when a partial word fills the context to its exact length
        fillers = [len(words) - preamble - 7 - extra for extra in (0, 1)]
        assert any(start == preamble + round(item.meta["depths"][0] * n) for n in fillers), item.id


def test_suite_runs_in_both_settings_on_a_tiny_model(tiny):
    model, tokenizer = tiny
    suite = get_suite("ruler")
    for question in ("after", "inside"):
        options = suite.parse_options({"n": 2, "lengths": [256], "tasks": ["niah_number", "common_words"],
                                       "question": question})
        items = suite.build_items(tokenizer, options)
        assert {item.prefill_pieces for item in items} == {1 if question == "after" else 2}
        full = suite.run(model, tokenizer, None, options)
        compressed = suite.run(model, tokenizer, evict_config(), options)
        assert [row["id"] for row in full.items] == [item.id for item in items]
        assert all(math.isfinite(v) for v in compressed.metrics.values())
        assert compressed.metrics["cache_fraction"] < full.metrics["cache_fraction"] == 1.0
        table = task_table(compressed, full)
        assert {(row["task"], row["n"]) for row in table} == {("niah_number", 2), ("common_words", 2)}
        # a random tiny model retrieves nothing: every task is diagnostic, so no headline mean
        assert all(row["diagnostic"] for row in table) and headline(table) is None


def test_lengths_beyond_the_model_are_skipped(tiny):
    model, tokenizer = tiny
    suite = get_suite("ruler")
    too_long = model.config.max_position_embeddings + 1
    result = suite.run(model, tokenizer, None, suite.parse_options({"n": 1, "lengths": [too_long]}))
    assert result.skipped and not result.items


def test_bad_options_are_named():
    suite = get_suite("ruler")
    with pytest.raises(Exception, match="question 'middle'"):
        suite.parse_options({"question": "middle"})
    with pytest.raises(Exception, match="niah_nope"):
        suite.parse_options({"tasks": ["niah_nope"]})
