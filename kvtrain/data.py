"""Text sources for calibration, perplexity and training: embedded text, local files, `datasets` names.

The embedded text is CPython's ``pydoc_data/topics.py`` (the language reference help topics): it ships
with every Python, so it works offline and is identical on every machine with the same Python.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from kvtrain.io import check_readable_file

EMBEDDED_SPLITS = ("train", "heldout")
# Every HELDOUT_EVERY-th topic (in sorted key order) is held out: a fixed rule, so every machine and every
# run agrees on which text was never calibrated or trained on.
HELDOUT_EVERY = 5
LOCAL_SUFFIXES = (".txt", ".jsonl")


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def embedded_text() -> str:
    """All pydoc help topics joined by blank lines, in sorted topic-key order (deterministic)."""
    return "\n\n".join(text for _, text in _topics())


def embedded_topics(split: str = "train") -> list[str]:
    """The embedded topics of one split.

    Topics are sorted by key; the topic at 0-based index ``i`` is held out when
    ``i % HELDOUT_EVERY == HELDOUT_EVERY - 1`` (the 5th, 10th, ...); all others are ``train``.
    """
    if split not in EMBEDDED_SPLITS:
        raise ValueError(f"unknown split {split!r} for the embedded text; choose one of {', '.join(EMBEDDED_SPLITS)}")
    want_heldout = split == "heldout"
    return [
        text for i, (_, text) in enumerate(_topics()) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == want_heldout
    ]


def load_texts(source: str | None = None, split: str = "train", *, text_field: str = "text") -> list[str]:
    """Load a list of documents.

    * ``None`` or ``"embedded"``: the pydoc topics, split ``"train"`` or ``"heldout"`` (see ``embedded_topics``).
    * a ``.txt`` path: the whole file is one document.
    * a ``.jsonl`` path: one document per non-empty line, from ``text_field``, or from a chat ``messages``
      list rendered as ``"role: content"`` lines.
    * anything else (including a local folder of data files): a ``datasets`` name, ``"name"`` or
      ``"name:config"``; ``split`` is passed through.

    Local files have no splits: ``split`` must be ``"train"`` for them (keep held-out text in its own file).
    """
    if source is None or source == "embedded":
        return embedded_topics(split)
    path = Path(source).expanduser()
    # A folder is left to `datasets`, which infers a loader from the data files inside it.
    if path.suffix in LOCAL_SUFFIXES or path.is_file():
        check_readable_file(path, "data file")
        if split != "train":
            raise ValueError(f"local file {path} has no {split!r} split; pass held-out text as its own file")
        return _load_local(path, text_field)
    return _load_dataset(source, split, text_field)


def _load_local(path: Path, text_field: str) -> list[str]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"text file {path} is empty")
        return [text]
    if path.suffix == ".jsonl":
        return _load_jsonl(path, text_field)
    raise ValueError(f"unsupported text file {path}: expected one of {', '.join(LOCAL_SUFFIXES)}")


def _load_jsonl(path: Path, text_field: str) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            texts.append(_record_text(record, text_field, f"{path}:{line_no}"))
    if not texts:
        raise ValueError(f"{path} contains no records")
    return texts


def _record_text(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field in record:
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
        return value
    if "messages" in record:
        return _render_messages(record["messages"], where)
    raise ValueError(f"{where}: record has neither field {text_field!r} nor 'messages' (keys: {sorted(record)})")


def _render_messages(messages: Any, where: str) -> str:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    lines = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise ValueError(f"{where}: messages[{i}] must be an object with string fields 'role' and 'content'")
        lines.append(f"{message['role']}: {message['content']}")
    return "\n".join(lines)


def _load_dataset(source: str, split: str, text_field: str) -> list[str]:
    import datasets

    name, _, config = source.partition(":")
    dataset = datasets.load_dataset(name, config or None, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(
            f"dataset {source!r} split {split!r} has no field {text_field!r}; columns: {dataset.column_names}"
        )
    return [str(t) for t in dataset[text_field]]


def token_blocks(
    tokenizer: Any,
    texts: Sequence[str] | Iterable[str],
    block_len: int,
    n_blocks: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Tokenise documents, join them with EOS, and cut blocks: LongTensor ``[n, block_len]``.

    Block ``i`` starts at token ``i * stride`` (default ``stride = block_len``: consecutive, disjoint blocks;
    a smaller stride gives overlapping windows, so a small corpus yields more distinct prompt/continuation
    splits). ``n`` is ``n_blocks`` when given (an error if the text is too short for that many), else every
    full block; the incomplete tail is dropped. No BOS or other special tokens are added inside documents.
    """
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    if n_blocks is not None and n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1 or None, got {n_blocks}")
    stride = block_len if stride is None else stride
    if not 1 <= stride <= block_len:
        raise ValueError(f"stride={stride} must be in [1, block_len={block_len}]")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("token_blocks needs a tokenizer with an eos_token_id to separate documents")
    needed = None if n_blocks is None else (n_blocks - 1) * stride + block_len
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i > 0:
            ids.append(eos)
        # Stop tokenising once enough tokens are collected: calibration often needs a few blocks of a large corpus.
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if needed is not None and len(ids) >= needed:
            break
    if len(ids) < block_len:
        raise ValueError(f"text too short: {len(ids)} tokens, fewer than one block of block_len={block_len}")
    available = (len(ids) - block_len) // stride + 1
    if n_blocks is not None and n_blocks > available:
        raise ValueError(
            f"text too short: {len(ids)} tokens give {available} blocks of {block_len} (stride {stride}), "
            f"but n_blocks={n_blocks}"
        )
    n = available if n_blocks is None else n_blocks
    return torch.tensor(ids, dtype=torch.long).unfold(0, block_len, stride)[:n].contiguous()


def texts_fingerprint(texts: Iterable[str]) -> str:
    """The sha256 of documents in their order: what a run read, recorded so that resuming it on other data (a file
    rewritten under the same name) is refused like any other changed argument."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()
