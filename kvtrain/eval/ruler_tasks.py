"""RULER-shaped synthetic tasks: our own wording and generators, over held-out text.

Each generator takes a seeded `random.Random` and returns a `Task`: the context (a haystack of held-out text
with needles at seeded depths, or a word list), the question, the answer cue the response continues, and the
expected values (all must appear in the response: RULER's string match). The context is fitted to a token
budget by the number of filler words (`fit_words`).

* `niah_number`, `niah_word`, `niah_uuid`: one needle "The hidden code for <key> is <value>." and the
  question for its key; the value is a 7-digit number, a word, or a UUID-like hex string;
* `niah_multikey`: the same with three distractor needles of other keys;
* `niah_multivalue`: four needles of the same key with different values, all asked;
* `niah_multiquery`: four needles of different keys, all asked;
* `variable_tracking`: a chain "Let X = 12345." "Let Y = X." ... hidden in the haystack, and distractor
  chains: which variables hold the value;
* `common_words`: a numbered word list where a few words recur often and the rest rarely: the most common;
* `frequent_words`: a text of words drawn with Zipf frequencies: the three most frequent.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from kvtrain.eval.heldout import heldout_paragraphs

TASKS = ("niah_number", "niah_word", "niah_uuid", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "common_words", "frequent_words")
MULTI = 4  # needles of the multi-needle tasks, hops of a variable chain
COMMON_WORDS = 5  # common-words extraction: how many words are common, each COMMON_REPEAT times
COMMON_REPEAT = 12
RARE_REPEAT = 2
FREQUENT_WORDS = 3  # frequent-words extraction: how many are asked


@dataclass
class Task:
    context: str
    question: str
    cue: str
    answers: list[str]
    needles: list[str] = field(default_factory=list)  # sentences placed in the haystack
    depths: list[float] = field(default_factory=list)  # where each needle sits (share of the filler words)


@lru_cache(maxsize=1)
def filler_words() -> tuple[str, ...]:
    return tuple(" ".join(heldout_paragraphs()).split())


@lru_cache(maxsize=4)
def vocabulary(tokenizer) -> tuple[str, ...]:
    """Distinct plain lower-case words (4-10 letters) of the held-out text that are one token after a space:
    keys, values and word lists. One token each, so every question of a task has the same token length and
    the items of a (task, length) share a token layout (a batch)."""
    words = sorted({w for w in filler_words() if w.isalpha() and w.islower() and 4 <= len(w) <= 10})
    return tuple(w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1)


def fit_words(count: Callable[[int], int], most: int, target: int, what: str = "ruler") -> int:
    """The largest n <= `most` with `count(n) <= target` (count grows with n), by binary search."""
    if count(0) > target:
        raise ValueError(f"{what}: {target} tokens cannot hold the task without any filler")
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def place(words: list[str], needles: list[str], depths: list[float]) -> str:
    """The filler `words` with each needle inserted before the word at `round(depth * len(words))`."""
    inserts = sorted(zip((round(d * len(words)) for d in depths), range(len(needles))))
    out, start = [], 0
    for at, i in inserts:
        out += words[start:at] + [needles[i]]
        start = at
    return " ".join(out + words[start:])


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4, 4, 12))


def _needle(key: str, value: str) -> str:
    return f"The hidden code for {key} is {value}."


def _haystack_task(rng: random.Random, keys: list[str], values: list[str], asked: list[str]) -> Task:
    needles = [_needle(k, v) for k, v in zip(keys, values)]
    answers = [v for k, v in zip(keys, values) if k in asked]
    if len(asked) == 1 and len(answers) == 1:
        question = f"What is the hidden code for {asked[0]} in the text above?"
        cue = f"The hidden code for {asked[0]} is"
    elif len(asked) == 1:
        question = f"What are all the hidden codes for {asked[0]} in the text above?"
        cue = f"The hidden codes for {asked[0]} are"
    else:
        question = f"What are the hidden codes for {', '.join(asked[:-1])} and {asked[-1]} in the text above?"
        cue = f"The hidden codes for {', '.join(asked[:-1])} and {asked[-1]} are"
    return Task("", question, cue, answers, needles, [rng.random() for _ in needles])


def niah(task: str, rng: random.Random, vocab: tuple[str, ...]) -> Task:
    """The needle-in-a-haystack tasks (needles and question; the haystack is added by `build_context`)."""
    keys = rng.sample(vocab, MULTI)
    if task in ("niah_number", "niah_word", "niah_uuid"):
        value = {"niah_number": _number, "niah_uuid": _uuid,
                 "niah_word": lambda r: r.choice([w for w in vocab if w not in keys])}[task](rng)
        return _haystack_task(rng, keys[:1], [value], keys[:1])
    if task == "niah_multikey":
        return _haystack_task(rng, keys, [_number(rng) for _ in keys], keys[:1])
    if task == "niah_multivalue":
        values = []
        while len(values) < MULTI:
            value = _number(rng)
            values += [value] if value not in values else []
        return _haystack_task(rng, keys[:1] * MULTI, values, keys[:1])
    if task == "niah_multiquery":
        return _haystack_task(rng, keys, [_number(rng) for _ in keys], keys)
    raise ValueError(f"{task!r} is not a needle task")


def _variable(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in taken:
            taken.add(name)
            return name


def variable_tracking(rng: random.Random) -> Task:
    """One chain of MULTI variables from a value, and a distractor chain from another value, in the haystack."""
    taken: set[str] = set()
    needles, answers, value = [], [], ""
    for chain in range(2):
        start = _number(rng)
        names = [_variable(rng, taken) for _ in range(MULTI)]
        needles += [f"Let {names[0]} = {start}."] + [f"Let {b} = {a}." for a, b in zip(names, names[1:])]
        if chain == 0:
            answers, value = names, start
    depths = sorted(rng.random() for _ in needles[:MULTI]) + sorted(rng.random() for _ in needles[MULTI:])
    return Task("", f"Which variables in the text above are given the value {value}, directly or through "
                    "another variable?", "They are", answers, needles, depths)


def common_words(rng: random.Random, vocab: tuple[str, ...], rare: int) -> Task:
    """A numbered list: COMMON_WORDS words COMMON_REPEAT times each and `rare` words RARE_REPEAT times each."""
    words = rng.sample(vocab, COMMON_WORDS + rare)
    common = words[:COMMON_WORDS]
    entries = common * COMMON_REPEAT + words[COMMON_WORDS:] * RARE_REPEAT
    rng.shuffle(entries)
    listing = "\n".join(f"{i}. {w}" for i, w in enumerate(entries, start=1))
    return Task(f"Here is a list of words.\n{listing}",
                f"Which {COMMON_WORDS} words appear most often in the list above?", "They are", common)


def frequent_words(rng: random.Random, vocab: tuple[str, ...], total: int) -> Task:
    """`total` words, the word of rank r appearing about total / (r^2 zeta(2)) times (at least once), shuffled;
    the FREQUENT_WORDS most frequent are strictly more frequent than any other."""
    vocab = rng.sample(vocab, 60)
    zeta = sum(1 / r**2 for r in range(1, len(vocab) + 1))
    counts = [max(1, round(total / (r * r * zeta))) for r in range(1, len(vocab) + 1)]
    entries = [w for w, c in zip(vocab, counts) for _ in range(c)][:total]
    rng.shuffle(entries)
    return Task("Here is a text of coded words.\n" + " ".join(entries),
                f"Which {FREQUENT_WORDS} words appear most often in the coded text above?", "They are",
                vocab[:FREQUENT_WORDS])
