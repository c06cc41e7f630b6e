"""Built-in verifiable tasks for GRPO, generated deterministically from a seed, and GSM8K-style data files.

Every item is a prompt, a reference and the checker (with its parameters) that scores a response to it, the
columns the ``task`` reward reads (`kvtrain.training.grpo.rewards`). A built-in item belongs to one split by its
prompt's content (`split_of`: a hash of the text), and each split keeps only its own prompts from its seed stream,
so an evaluation on held-out items never sees a training prompt, whatever the seeds, counts and parameters (seed
streams alone do not do that: a task with few distinct prompts repeats them in both):

* ``passkey``: a 5-digit pass key hidden at a random depth in filler sentences, asked for at the end
  (checker ``first_number``). Long filler makes it a retrieval from a compressed context.
* ``arithmetic``: the sum or difference of two `digits`-digit numbers (``first_number``).
* ``copy``: a list of random words at the start of filler text, to repeat verbatim (``verbatim_prefix``).
* ``format``: a short question with an instruction about the answer's form: all lowercase, or ending with a
  given word (``lowercase``, ``ends_with``).
* ``gsm8k``: question/answer records (the GSM8K layout: the answer ends with ``#### <number>``) from a
  `dataset_name` (a .jsonl file or a `datasets` name); the prompt asks for "The answer is <number>" and the
  checker is ``math_answer`` (math-verify).

Task parameters (`task_param KEY=VALUE`): passkey ``filler`` (sentences, default 8); arithmetic ``digits``
(default 2) and ``ops`` (default "+-"); copy ``words`` (default 4) and ``filler`` (default 6).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TRAIN, HELDOUT = "train", "heldout"
# Held-out items come from another seed stream than training items of the same seed.
_HELDOUT_SALT = 1_000_003
# One prompt in HELDOUT_EVERY (by its hash) is held out.
HELDOUT_EVERY = 5
# Draws per requested item before a split is declared too small for the request (the smallest built-in split,
# format's held-out prompts, needs ~5 draws per item).
_MAX_DRAWS_PER_ITEM = 200

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
WORDS = (
    "apple", "river", "candle", "mirror", "garden", "pencil", "rocket", "window", "forest", "button",
    "silver", "planet", "ladder", "orange", "bridge", "pillow", "castle", "dragon", "jacket", "marble",
)
QUESTIONS = (
    "Name a fruit.",
    "What color is the sky on a clear day?",
    "Name an animal that lives in the sea.",
    "What do bees make?",
    "Name a musical instrument.",
    "What season comes after winter?",
    "Name a planet of the solar system.",
    "What do you use to write on paper?",
    "Name a vegetable.",
    "What is frozen water called?",
    "Name a bird that cannot fly.",
    "What do cows drink?",
    "Name a color of the rainbow.",
    "What is the opposite of cold?",
    "Name a tool used to cut wood.",
    "How many legs does a spider have?",
    "Name a country in Europe.",
    "What do plants need from the sun?",
    "Name something you wear on your feet.",
    "What is the capital of France?",
    "Name a sport played with a ball.",
    "What shape has three sides?",
    "Name a month with thirty days.",
    "What do you call a baby cat?",
)


@dataclass
class TaskItem:
    prompt: str
    reference: str | None
    checker: str
    checker_params: dict[str, Any] = field(default_factory=dict)

    def row(self, task: str) -> dict[str, Any]:
        """The dataset row: the checker's parameters as JSON, so rows of different tasks share one schema."""
        return {"prompt": self.prompt, "reference": self.reference or "", "checker": self.checker,
                "checker_params": json.dumps(self.checker_params, sort_keys=True), "task": task}


Generator = Callable[..., TaskItem]
TASKS: dict[str, Generator] = {}


def _task(name: str) -> Callable[[Generator], Generator]:
    def decorate(fn: Generator) -> Generator:
        TASKS[name] = fn
        return fn

    return decorate


@_task("passkey")
def passkey(rng: random.Random, filler: int = 8) -> TaskItem:
    key = rng.randint(10000, 99999)
    sentences = [FILLER[i % len(FILLER)] for i in range(filler)]
    sentences.insert(rng.randint(0, filler), f"The pass key is {key}. Remember it. {key} is the pass key.")
    prompt = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
              + " ".join(sentences) + "\nWhat is the pass key?")
    return TaskItem(prompt, str(key), "first_number")


@_task("arithmetic")
def arithmetic(rng: random.Random, digits: int = 2, ops: str = "+-") -> TaskItem:
    if digits < 1 or not ops or set(ops) - set("+-"):
        raise ValueError(f"arithmetic: digits={digits} must be >= 1 and ops={ops!r} a non-empty mix of '+' and '-'")
    a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
    op = rng.choice(ops)
    return TaskItem(f"What is {a} {op} {b}? Answer with the number only.", str(a + b if op == "+" else a - b),
                    "first_number")


@_task("copy")
def copy_words(rng: random.Random, words: int = 4, filler: int = 6) -> TaskItem:
    chosen = " ".join(rng.sample(WORDS, words))
    text = " ".join(FILLER[i % len(FILLER)] for i in range(filler))
    prompt = f"Remember these words: {chosen}\n{text}\nRepeat the words you had to remember, in order."
    return TaskItem(prompt, chosen, "verbatim_prefix")


@_task("format")
def answer_format(rng: random.Random) -> TaskItem:
    question = rng.choice(QUESTIONS)
    if rng.random() < 0.5:
        return TaskItem(f"{question} Answer in lowercase letters only.", None, "lowercase")
    word = rng.choice(("DONE", "END", "STOP"))
    return TaskItem(f"{question} End your answer with the word {word}.", None, "ends_with", {"phrase": word})


def task_items(task: str, count: int, *, seed: int, split: str = TRAIN, params: dict[str, Any] | None = None) -> list[TaskItem]:
    """`count` items of a built-in task, the same for the same (task, seed, split, params) on every machine."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(sorted(TASKS))}, or gsm8k with a dataset_name")
    if split not in (TRAIN, HELDOUT):
        raise ValueError(f"split={split!r} must be {TRAIN!r} or {HELDOUT!r}")
    rng = random.Random(seed + (_HELDOUT_SALT if split == HELDOUT else 0))
    items: list[TaskItem] = []
    for _ in range(count * _MAX_DRAWS_PER_ITEM):
        if len(items) == count:
            return items
        try:
            item = TASKS[task](rng, **(params or {}))
        except TypeError as err:
            raise ValueError(f"task {task!r}: bad task_param {sorted(params or {})} ({err})") from None
        if split_of(item.prompt) == split:
            items.append(item)
    if len(items) == count:
        return items
    raise ValueError(f"task {task!r} with task_param {params or {}}: its {split} split has too few distinct prompts "
                     f"for {count} items (found {len(items)} in {count * _MAX_DRAWS_PER_ITEM} draws)")


def split_of(prompt: str) -> str:
    """The split a built-in prompt belongs to, from its text alone: the same on every machine and in every run."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % HELDOUT_EVERY
    return HELDOUT if bucket == 0 else TRAIN


def gsm8k_item(record: dict[str, Any], where: str) -> TaskItem:
    """A GSM8K record (``question``, ``answer`` ending with ``#### <number>``) as a task item."""
    if "question" not in record or "answer" not in record:
        raise ValueError(f"{where}: a gsm8k record needs 'question' and 'answer' fields, got {sorted(record)}")
    answer = str(record["answer"])
    if "####" not in answer:
        raise ValueError(f"{where}: the answer does not end with '#### <number>': {answer[-60:]!r}")
    final = answer.rsplit("####", 1)[1].strip().replace(",", "")
    prompt = (f"{record['question']}\nReason step by step, then finish with \"The answer is <number>.\"")
    return TaskItem(prompt, final, "math_answer")


def gsm8k_items(source: str, split: str = "train", limit: int | None = None) -> list[TaskItem]:
    """GSM8K-style items from a .jsonl file or a `datasets` name ("name" or "name:config")."""
    if source.endswith(".jsonl"):
        with open(source) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    else:
        import datasets

        name, _, config = source.partition(":")
        records = list(datasets.load_dataset(name, config or None, split=split))
    records = records[:limit] if limit is not None else records
    return [gsm8k_item(r, f"{source} record {i}") for i, r in enumerate(records)]
