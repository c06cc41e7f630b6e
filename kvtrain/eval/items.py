"""Evaluation items as portable records: a prompt, and the checks its response must pass.

Every built-in suite builds its items deterministically (seeded) and can export them as JSONL, one item per
line, so any other system can answer the same prompts and be scored by the same checkers
(`kvtrain eval score`). The prompt is the exact text the model is fed (chat template already applied),
made of named `pieces`: kvtrain prefills the first `prefill_pieces` of them in one forward (that is where the
cache compresses them), then feeds the rest one token at a time, as a user turn arriving after a compressed
system prompt or document would be, and then generates. Pieces are tokenised one by one, so each piece is an
exact token span (the spans whose keep rates the instruction suite reports).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvtrain.config import ConfigError
from kvtrain.eval.checkers import get_checker, run_checker
from kvtrain.io import atomic_write_text, check_readable_file


@dataclass
class Check:
    """One scored property of a response: `checker(response, reference, **params)`."""
    name: str  # what is checked, e.g. "instruction:lowercase" or "answer"
    checker: str
    reference: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def score(self, response: str) -> float:
        return run_checker(self.checker, response, self.reference, self.params)


@dataclass
class EvalItem:
    id: str
    suite: str
    pieces: list[tuple[str, str]]  # (name, text); the prompt is their concatenation
    prefill_pieces: int  # how many leading pieces are prefilled (and compressed) in one forward
    checks: list[Check]
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)  # the response ends before the first of these
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pieces = _whitespace_leads([tuple(p) for p in self.pieces])
        if not 1 <= self.prefill_pieces <= len(self.pieces):
            raise ValueError(f"item {self.id!r}: prefill_pieces={self.prefill_pieces} must be in [1, {len(self.pieces)}]")

    @property
    def prompt(self) -> str:
        """Exactly what precedes the response."""
        return "".join(text for _, text in self.pieces)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, **asdict(self), "pieces": [list(p) for p in self.pieces]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "item") -> "EvalItem":
        known = {f for f in cls.__dataclass_fields__} | {"prompt"}
        unknown = set(data) - known
        missing = {"id", "suite", "pieces", "prefill_pieces", "checks", "max_new_tokens"} - set(data)
        if unknown or missing:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
        checks = []
        for i, check in enumerate(data["checks"]):
            if not isinstance(check, dict) or "checker" not in check or "name" not in check:
                raise ConfigError(f"{where}: checks[{i}] must be an object with 'name' and 'checker'")
            get_checker(check["checker"])  # an unknown checker is named here, before any model runs
            checks.append(Check(**check))
        fields = {k: v for k, v in data.items() if k != "prompt"}  # the prompt is derived from the pieces
        return cls(**{**fields, "checks": checks})


def _whitespace_leads(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Move each piece's trailing whitespace to the start of the next piece. Byte-level BPE tokenizers attach
    whitespace to what follows it, so pieces cut this way tokenise one by one exactly as the whole prompt does."""
    out = []
    carry = ""
    for i, (name, text) in enumerate(pieces):
        text = carry + text
        stripped = text if i == len(pieces) - 1 else text.rstrip()
        carry = text[len(stripped):]
        out.append((name, stripped))
    return out


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the first stop string."""
    cut = len(text)
    for s in stop:
        at = text.find(s)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def score_item(item: EvalItem, response: str) -> dict[str, float]:
    response = cut_at_stop(response, item.stop)
    return {check.name: check.score(response) for check in item.checks}


def write_items(path: str | Path, items: list[EvalItem]) -> None:

    atomic_write_text(path, "".join(json.dumps(item.to_dict(), ensure_ascii=False) + "\n" for item in items))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = check_readable_file(path, "JSONL file")
    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
    return records


def read_items(path: str | Path) -> list[EvalItem]:
    """The items of a JSONL file (`kvtrain eval export`); a file without any is an error, not a zero score."""
    items = [EvalItem.from_dict(r, f"{path}:{i + 1}") for i, r in enumerate(read_jsonl(path))]
    if not items:
        raise ConfigError(f"{path}: no items (the file is empty); write them with `kvtrain eval export`")
    return items


def score_responses(items: list[EvalItem], responses: dict[str, str]) -> list[dict[str, Any]]:
    """Per item: its id and the score of every check. `responses` maps item id -> response text."""
    missing = [item.id for item in items if item.id not in responses]
    if missing:
        raise ConfigError(f"no response for item(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return [{"id": item.id, **score_item(item, responses[item.id])} for item in items]
