"""Portable items: deterministic, exported and read back as JSONL, scored by name; pieces tokenise exactly."""

from __future__ import annotations

import json

import pytest

from kvtrain.eval.generation import tokenize_pieces
from kvtrain.eval.items import Check, EvalItem, cut_at_stop, read_items, score_responses, write_items
from kvtrain.eval.suites import get_suite

ITEM_SUITES = {"retrieval": {"lengths": [96], "depths": [0.2, 0.8]}, "instructions": {"prompts": 2},
               "reasoning": {"chains": 2, "word_problems": 3}}


@pytest.mark.parametrize("suite_name", sorted(ITEM_SUITES))
def test_items_are_deterministic_and_round_trip_through_jsonl(suite_name, tiny, tmp_path):
    _, tokenizer = tiny
    suite = get_suite(suite_name)
    options = suite.parse_options(ITEM_SUITES[suite_name])
    items = suite.build_items(tokenizer, options)
    assert [i.to_dict() for i in items] == [i.to_dict() for i in suite.build_items(tokenizer, options)]
    assert len({i.id for i in items}) == len(items)
    write_items(tmp_path / "items.jsonl", items)
    lines = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert all({"id", "prompt", "checks"} <= set(line) for line in lines)
    assert all(line["prompt"] == item.prompt for line, item in zip(lines, items))
    back = read_items(tmp_path / "items.jsonl")
    assert [i.to_dict() for i in back] == [i.to_dict() for i in items]


def test_scoring_exported_items_by_name():
    items = [EvalItem("a", "x", [("p", "Q")], 1, [Check("answer", "first_number", "42")], 4, stop=["\n"]),
             EvalItem("b", "x", [("p", "Q")], 1, [Check("lower", "lowercase"), Check("short", "max_words", None,
                                                                                   {"limit": 2})], 4)]
    scores = score_responses(items, {"a": " 42\n7", "b": "two words"})
    assert scores == [{"id": "a", "answer": 1.0}, {"id": "b", "lower": 1.0, "short": 1.0}]
    assert score_responses(items, {"a": "7 42", "b": "Three words here"})[1] == {"id": "b", "lower": 0.0, "short": 0.0}
    with pytest.raises(ValueError, match=r"no response for item\(s\) \['b'\]"):
        score_responses(items, {"a": "42"})


def test_an_unknown_checker_in_a_file_is_named_with_its_line(tmp_path):
    record = {"id": "a", "suite": "x", "pieces": [["p", "Q"]], "prefill_pieces": 1, "max_new_tokens": 4,
              "checks": [{"name": "answer", "checker": "exact"}]}
    (tmp_path / "items.jsonl").write_text("\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"unknown checker 'exact'"):
        read_items(tmp_path / "items.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: unknown fields \[\], missing fields"):
        read_items(tmp_path / "bad.jsonl")


def test_pieces_move_whitespace_forward_and_give_exact_token_spans(tiny):
    _, tokenizer = tiny
    item = EvalItem("a", "x", [("first", "the cat \n\n"), ("second", "sat on"), ("third", " the mat ")], 2,
                    [Check("c", "lowercase")], 4)
    assert item.pieces == [("first", "the cat"), ("second", " \n\nsat on"), ("third", " the mat ")]
    assert item.prompt == "the cat \n\nsat on the mat "
    ids, spans = tokenize_pieces(tokenizer, item)
    assert ids[0] == tokenizer.bos_token_id and spans == [(1, 3), (3, 5), (5, 7)]
    assert ids == tokenizer(item.prompt)["input_ids"]


def test_cut_at_stop():
    assert cut_at_stop("7 + 2 = 9.\n\nQ: next", ["\nQ:", "\n\n"]) == "7 + 2 = 9."
    assert cut_at_stop("no stop", ["\n"]) == "no stop"
