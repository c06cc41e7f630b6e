"""GRPO rewards, registered by name: each scores completions with the evaluation suite's checkers
(`kvtrain.eval.checkers`, called by name through its `run_checker`), so a reward and the evaluation of the same
task agree by construction.

Rewards (`build_rewards(names)` returns TRL reward functions, named so TRL logs `rewards/<name>/mean`):

* ``task``: each completion is scored by its own item's checker (dataset columns ``checker``, ``reference``,
  ``checker_params``), so one recipe can mix tasks;
* ``math_verify``: GSM8K-style, the checker ``math_answer`` against the ``reference`` column (the first
  "The answer is X", compared by math-verify).

A reward that raises, returns NaN or infinity, or returns the wrong number of scores stops training with a
`RewardError` naming the reward and the completion: a broken reward silently skipped or scored 0 would train the
policy on a wrong signal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from kvtrain.errors import UserError
from kvtrain.eval.checkers import run_checker

RewardFunction = Callable[..., list[float]]
REWARDS: dict[str, Callable[[], RewardFunction]] = {}


class RewardError(UserError):
    """A reward failed on a completion; the message names the reward and the completion."""


class UnknownRewardError(UserError):
    """A reward or checker name that is not registered; the message lists the registered ones."""


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
