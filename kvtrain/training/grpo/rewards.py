"""GRPO rewards, registered by name: each scores completions through a checker called by name.

A checker is a small pure function `checker(response, reference=None, **params) -> float` in [0, 1], the
convention of the evaluation suite's checkers (they double as rewards). Every reward reaches them through one
adapter, `run_checker`; the few checkers the built-in tasks need live here until the evaluation suite's registry
(`kvtrain.eval.checkers`, landing separately) replaces them behind that same adapter, names and semantics alike.

Rewards (`build_rewards(names)` returns TRL reward functions, named so TRL logs `rewards/<name>/mean`):

* ``task``: each completion is scored by its own item's checker (dataset columns ``checker``, ``reference``,
  ``checker_params``), so one recipe can mix tasks;
* ``math_verify``: GSM8K-style, ``math_answer`` against the ``reference`` column (the first "The answer is X",
  compared by math-verify).

A reward that raises, returns NaN or infinity, or returns the wrong number of scores stops training with a
`RewardError` naming the reward and the completion: a broken reward silently skipped or scored 0 would train the
policy on a wrong signal.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

Checker = Callable[..., float]
CHECKERS: dict[str, Checker] = {}
RewardFunction = Callable[..., list[float]]
REWARDS: dict[str, Callable[[], RewardFunction]] = {}


class RewardError(ValueError):
    """A reward failed on a completion; the message names the reward and the completion."""


class UnknownRewardError(ValueError):
    """A reward or checker name that is not registered; the message lists the registered ones."""


# ------------------------------------------------------------------ checkers (the evaluation suite's convention)
def _checker(name: str) -> Callable[[Checker], Checker]:
    def decorate(fn: Checker) -> Checker:
        CHECKERS[name] = fn
        return fn

    return decorate


def run_checker(name: str, response: str, reference: str | None = None, params: dict | None = None) -> float:
    """The one adapter between rewards and checkers: score `response` with the checker `name`."""
    if name not in CHECKERS:
        raise UnknownRewardError(f"unknown checker {name!r}; registered checkers: {', '.join(sorted(CHECKERS))}")
    return float(CHECKERS[name](response, reference, **(params or {})))


def _need(reference: str | None, name: str) -> str:
    if reference is None:
        raise ValueError(f"checker {name!r} needs a reference")
    return reference


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER = re.compile(r"answer is\s*:?\s*\$?(-?\d+(?:\.\d+)?)", re.IGNORECASE)


@_checker("first_number")
def first_number(response: str, reference: str | None = None) -> float:
    """The first number in the response equals the reference (a passkey, a sum)."""
    match = _NUMBER.search(response)
    return float(match is not None and match.group() == _need(reference, "first_number").strip())


@_checker("verbatim_prefix")
def verbatim_prefix(response: str, reference: str | None = None, words: int | None = None) -> float:
    """The response starts with the reference's first `words` words (all by default), whitespace normalised."""
    expected = _need(reference, "verbatim_prefix").split()
    if words is not None:
        expected = expected[:words]
    if not expected:
        raise ValueError("verbatim_prefix: the reference has no words")
    return float(response.split()[: len(expected)] == expected)


@_checker("lowercase")
def lowercase(response: str, reference: str | None = None) -> float:
    """Has letters, and none of them is upper case."""
    return float(any(c.isalpha() for c in response) and response == response.lower())


@_checker("ends_with")
def ends_with(response: str, reference: str | None = None, phrase: str = "") -> float:
    """The response, trailing whitespace ignored, ends with `phrase` (case ignored)."""
    if not phrase:
        raise ValueError("ends_with needs a non-empty phrase")
    return float(response.rstrip().lower().endswith(phrase.lower()))


@_checker("math_answer")
def math_answer(response: str, reference: str | None = None) -> float:
    """The first "The answer is X" statement equals the reference by math-verify (12 = 12.0); 0 without one."""
    from math_verify import parse, verify

    match = _ANSWER.search(response)
    if match is None:
        return 0.0
    return float(verify(parse(_need(reference, "math_answer")), parse(match.group(1))))


# ------------------------------------------------------------------ rewards
def register_reward(name: str) -> Callable[[Callable[[], RewardFunction]], Callable[[], RewardFunction]]:
    def decorate(factory: Callable[[], RewardFunction]) -> Callable[[], RewardFunction]:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = factory
        return factory

    return decorate


def completion_text(completion) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion if isinstance(message, dict))


@register_reward("task")
def task_reward() -> RewardFunction:
    def reward(completions, checker, reference, checker_params, **_) -> list[float]:
        return [
            run_checker(name, completion_text(c), ref, json.loads(params) if params else None)
            for c, name, ref, params in zip(completions, checker, reference, checker_params, strict=True)
        ]

    return reward


@register_reward("math_verify")
def math_verify_reward() -> RewardFunction:
    def reward(completions, reference, **_) -> list[float]:
        return [run_checker("math_answer", completion_text(c), ref) for c, ref in zip(completions, reference, strict=True)]

    return reward


def build_rewards(names: list[str]) -> list[RewardFunction]:
    """TRL reward functions for `names`, each checked (see the module docstring) and named after its reward."""
    if not names:
        raise UnknownRewardError(f"no reward named; registered rewards: {', '.join(sorted(REWARDS))}")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise UnknownRewardError(f"unknown reward(s) {unknown}; registered rewards: {', '.join(sorted(REWARDS))}")
    return [checked(name, REWARDS[name]()) for name in names]


def checked(name: str, fn: RewardFunction) -> RewardFunction:
    """`fn` with its failures turned into a `RewardError` naming the reward and the completion."""

    def reward(prompts, completions, **kwargs) -> list[float]:
        try:
            scores = fn(prompts=prompts, completions=completions, **kwargs)
        except RewardError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of a reward stops training, named
            index = _failing_index(fn, prompts, completions, kwargs)
            where = f" on completion {index} ({completion_text(completions[index])[:80]!r})" if index is not None else ""
            raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}{where}") from err
        if len(scores) != len(completions):
            raise RewardError(f"reward {name!r} returned {len(scores)} scores for {len(completions)} completions")
        for i, score in enumerate(scores):
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                raise RewardError(f"reward {name!r} returned {score!r} for completion {i} "
                                  f"({completion_text(completions[i])[:80]!r}); a reward must be a finite number")
        return [float(s) for s in scores]

    reward.__name__ = name
    return reward


def _failing_index(fn: RewardFunction, prompts, completions, kwargs) -> int | None:
    """The first completion that `fn` fails on alone (to name it), or None when none does."""
    for i in range(len(completions)):
        one = {k: v[i : i + 1] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
        try:
            fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **one)
        except Exception:  # noqa: BLE001
            return i
    return None
