"""On SmolLM2's tokenizer: every built-in item's pieces tokenise exactly as its whole prompt, items of a kind
share one token layout (one batch), and the full-cache model finds the passkey."""

from __future__ import annotations

from collections import Counter

import pytest

from kvtrain.eval.generation import run_items, tokenize_pieces
from kvtrain.eval.suites import get_suite

pytestmark = pytest.mark.slow


def _layouts(tokenizer, items):
    out = Counter()
    for item in items:
        ids, spans = tokenize_pieces(tokenizer, item)
        assert ids == tokenizer(item.prompt)["input_ids"], item.id
        out[(item.meta.get("kind"), item.meta.get("order"), spans[item.prefill_pieces - 1][1], len(ids))] += 1
    return out


def test_items_tokenise_exactly_and_batch_by_kind(smollm2):
    _, tokenizer = smollm2
    built = {name: get_suite(name).build_items(tokenizer, get_suite(name).parse_options(options)) for name, options in
             [("retrieval", {"lengths": [192, 384], "depths": [0.25, 0.75], "kinds": ["passkey", "copy"]}),
              ("instructions", {"prompts": 3, "orders": ["defence_first", "defence_last"]}),
              ("reasoning", {"chains": 3, "word_problems": 3})]}
    # passkeys and copies: one layout per kind and length (needles differ: the hidden words vary in tokens);
    # instructions: one per order and kind of user turn; reasoning: one for chains, one for word problems
    assert sorted(_layouts(tokenizer, built["retrieval"]).values()) == [2] * 4
    assert sorted(_layouts(tokenizer, built["instructions"]).values()) == [3] * 4
    assert sorted(_layouts(tokenizer, built["reasoning"]).values()) == [3, 3]


def test_full_cache_finds_the_passkey(smollm2):
    model, tokenizer = smollm2
    suite = get_suite("retrieval")
    items = suite.build_items(tokenizer, suite.parse_options({"lengths": [192], "depths": [0.25, 0.75],
                                                              "kinds": ["passkey"]}))
    runs = run_items(model, tokenizer, items, None)
    assert [item.checks[0].score(run.response) for item, run in zip(items, runs)] == [1.0, 1.0]
