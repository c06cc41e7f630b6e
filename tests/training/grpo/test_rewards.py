"""GRPO rewards score with the evaluation suite's checkers (kvtrain.eval.checkers) and math-verify, on hand-written
completions whose right score is obvious; and every built-in task's items name a checker of that suite."""

from __future__ import annotations

import json

import pytest

from kvtrain.eval import checkers
from kvtrain.training.grpo.rewards import build_rewards
from kvtrain.training.grpo.tasks import TASKS, gsm8k_item, task_items


def score(reward_name: str, completions: list, **columns) -> list[float]:
    (reward,) = build_rewards([reward_name])
    return reward(prompts=[""] * len(completions), completions=completions, **columns)


def task_columns(items) -> dict[str, list]:
    rows = [item.row("t") for item in items]
    return {key: [row[key] for row in rows] for key in ("checker", "reference", "checker_params")}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_built_in_task_names_a_checker_of_the_evaluation_suite(task):
    for item in task_items(task, 20, seed=0):
        assert item.checker in checkers.CHECKERS


def test_task_reward_scores_each_row_with_its_own_checker():
    passkey = task_items("passkey", 1, seed=0)[0]
    fmt = [it for it in task_items("format", 20, seed=0) if it.checker == "ends_with"][0]
    items = [passkey, passkey, fmt, fmt]
    word = fmt.checker_params["phrase"]
    completions = [f"The pass key is {passkey.reference}.", "It is 12345 or so.", f"Blue. {word.lower()}", "Blue."]
    # Conversational completions (TRL's chat form) are read as their text.
    completions[2] = [{"role": "assistant", "content": completions[2]}]
    assert score("task", completions, **task_columns(items)) == [1.0, float(passkey.reference == "12345"), 1.0, 0.0]


def test_task_reward_goes_through_the_evaluation_suites_registry(monkeypatch):
    """Replacing the suite's checker changes the reward: the reward holds no copy of it."""
    monkeypatch.setitem(checkers.CHECKERS, "first_number", lambda response, reference=None: 0.25)
    item = task_items("arithmetic", 1, seed=0)[0]
    assert score("task", ["anything"], **task_columns([item])) == [0.25]


def test_math_verify_reward_compares_values_not_strings():
    item = gsm8k_item({"question": "q", "answer": "6 * 2 = 12\n#### 12"}, "test")
    completions = ["So the answer is 12.0.", "The answer is 12", "The answer is 13", "Twelve."]
    assert score("math_verify", completions, reference=[item.reference] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_checker_parameters_travel_as_json_columns():
    item = [it for it in task_items("format", 20, seed=1) if it.checker == "ends_with"][0]
    assert json.loads(item.row("format")["checker_params"]) == {"phrase": item.checker_params["phrase"]}
