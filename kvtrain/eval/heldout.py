"""Held-out evaluation text, checked against the training split.

The embedded text (`kvtrain.data`) holds out every 5th pydoc topic, and calibration and distillation read the
`train` split only. Topics share boilerplate, though, so a held-out paragraph may still repeat training text.
Here a passage counts as seen in training when any run of `NGRAM` consecutive words of it occurs in the
training split; evaluation text is built from held-out paragraphs that have no such run, and
`check_not_in_training` verifies any final text (haystacks with needles, prompts) the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from kvtrain.data import load_texts, token_blocks

NGRAM = 13  # words: long enough that a shared run is copied text, not a common phrase


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@lru_cache(maxsize=1)
def training_ngrams(n: int = NGRAM) -> frozenset[tuple[str, ...]]:

    grams: set[tuple[str, ...]] = set()
    for text in load_texts(None, "train"):
        grams |= _ngrams(text.split(), n)
    return frozenset(grams)


def seen_in_training(text: str, n: int = NGRAM) -> list[str]:
    """The `n`-word runs of `text` that occur in the training split (empty: none)."""
    train = training_ngrams(n)
    return [" ".join(g) for g in _ngrams(text.split(), n) if g in train]


def check_not_in_training(texts: Iterable[str], what: str = "evaluation text") -> None:
    """Raise ValueError naming the first text that shares a `NGRAM`-word run with the training split."""
    for i, text in enumerate(texts):
        shared = seen_in_training(text)
        if shared:
            raise ValueError(f"{what} #{i} repeats {len(shared)} {NGRAM}-word run(s) of the training split, "
                             f"e.g. {shared[0]!r}")


@lru_cache(maxsize=1)
def heldout_paragraphs(min_words: int = 20) -> tuple[str, ...]:
    """Paragraphs of the held-out split (whitespace normalised, at least `min_words` words) that share no
    `NGRAM`-word run with the training split, in a fixed order."""

    out = []
    for topic in load_texts(None, "heldout"):
        for block in topic.split("\n\n"):
            words = block.split()
            if len(words) >= min_words:
                paragraph = " ".join(words)
                if not seen_in_training(paragraph):
                    out.append(paragraph)
    return tuple(out)


def evaluation_texts(source: str | None, split: str, *, text_field: str = "text") -> list[str]:
    """The documents a held-out measurement (loyalty, perplexity) reads. For the embedded text's held-out split: its
    filtered paragraphs (`heldout_paragraphs`) as one document, so that nothing measured repeats a run of the
    training split; any other source and split as `load_texts` reads them (their owner decides what is held out)."""
    if source in (None, "embedded") and split == "heldout":
        return ["\n\n".join(heldout_paragraphs())]
    return load_texts(source, split, text_field=text_field)


def heldout_blocks(tokenizer, source: str | None, split: str, block_len: int, n_blocks: int, *,
                   text_field: str = "text"):
    """`n_blocks` token blocks [n, block_len] of `evaluation_texts` (what the quickstart, distillation's loyalty and
    the benchmarks measure on)."""
    return token_blocks(tokenizer, evaluation_texts(source, split, text_field=text_field), block_len, n_blocks)
