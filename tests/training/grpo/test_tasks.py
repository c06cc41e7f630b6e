"""Built-in GRPO tasks: held-out prompts are never training prompts, for every task and any seeds, also where a
task has few distinct prompts (format); a split that holds none of a task's prompts is refused, not filled with
the other split's."""

from __future__ import annotations

import pytest

from kvtrain.training.grpo.tasks import HELDOUT, TASKS, TRAIN, TaskItem, split_of, task_items


@pytest.mark.parametrize("task", sorted(TASKS))
def test_heldout_prompts_are_never_training_prompts(task):
    train = {item.prompt for seed in (0, 1, 7) for item in task_items(task, 128, seed=seed, split=TRAIN)}
    heldout = {item.prompt for seed in (0, 3) for item in task_items(task, 64, seed=seed, split=HELDOUT)}
    assert heldout and train
    assert not train & heldout


def test_items_are_reproducible_per_seed_and_split():
    assert [i.prompt for i in task_items("arithmetic", 8, seed=5)] == [i.prompt for i in task_items("arithmetic", 8, seed=5)]
    assert [i.prompt for i in task_items("arithmetic", 8, seed=5)] != [i.prompt for i in task_items("arithmetic", 8, seed=6)]


def test_a_split_without_prompts_is_refused(monkeypatch):
    prompt = next(p for p in (f"Say {i}." for i in range(100)) if split_of(p) == TRAIN)
    monkeypatch.setitem(TASKS, "one_prompt", lambda rng: TaskItem(prompt, None, "lowercase"))
    assert len(task_items("one_prompt", 3, seed=0, split=TRAIN)) == 3
    with pytest.raises(ValueError, match=r"task 'one_prompt' .*heldout split has too few distinct prompts"):
        task_items("one_prompt", 1, seed=0, split=HELDOUT)
