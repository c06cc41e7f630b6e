"""The project's words stay true: every reference to a file under docs/ (and to a section of it) exists, no
comment cites notes that are not in this repository, and every `kvtrain.…` name written in backticks in a
docstring, a comment, docs/ or the README still names something that exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p for folder in ("kvtrain", "train", "scripts", "tests") for p in (ROOT / folder).rglob("*.py")
    if p.name != "test_docs.py" and not p.is_symlink()
)
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

DOC_REFERENCE = re.compile(r"(?<![\w/])docs/([\w./-]+\.md)(?:#([\w-]+))?")
# Notes we keep outside the repository; a citation of one sends a reader nowhere.
FOREIGN_NOTE = re.compile(r"(?<![\w/])(?:docs/)?(?:platform|anchors|design)\.md|(?<![\w/])methods\.md\s*§")
DOTTED_NAME = re.compile(r"`(kvtrain(?:\.\w+)+)`")
REPO_PATH = re.compile(r"(?<![\w/.<-])((?:kvtrain|scripts|tests|train|configs|recipes|benchmarks)/[\w./-]*\.(?:py|yaml|json|md))")


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def doc_reference_errors(text: str, where: str) -> list[str]:
    errors = []
    for match in DOC_REFERENCE.finditer(text):
        target = ROOT / "docs" / match.group(1)
        if not target.is_file():
            errors.append(f"{where}: docs/{match.group(1)} does not exist")
        elif match.group(2) and match.group(2) not in anchors(target):
            errors.append(f"{where}: docs/{match.group(1)} has no section #{match.group(2)}")
    errors += [f"{where}: cites {m.group(0)!r}, which is not in this repository" for m in FOREIGN_NOTE.finditer(text)]
    return errors


def missing_paths(text: str) -> list[str]:
    """Repository paths named in `text` that do not exist (a trailing dot ends the sentence, not the path)."""
    return sorted({m.group(1) for m in REPO_PATH.finditer(text) if not (ROOT / m.group(1)).exists()})


def resolves(dotted: str) -> bool:
    """Whether `dotted` is a module, or an attribute (chain) of one."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("path", SOURCES + TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_references_to_docs_exist(path):
    assert doc_reference_errors(path.read_text(), str(path.relative_to(ROOT))) == []


@pytest.mark.parametrize("path", [p for p in SOURCES if "kvtrain" in p.parts] + TEXTS,
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_named_kvtrain_objects_exist(path):
    missing = sorted({m.group(1) for m in DOTTED_NAME.finditer(path.read_text()) if not resolves(m.group(1))})
    assert missing == [], f"{path.relative_to(ROOT)} names objects that do not exist: {missing}"


@pytest.mark.parametrize("path", SOURCES + TEXTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(path):
    assert missing_paths(path.read_text()) == []


def test_the_checks_fail_on_planted_defects():
    assert missing_paths("see kvtrain/sals_cache.py and kvtrain/runtime/cache.py") == ["kvtrain/sals_cache.py"]
    assert doc_reference_errors("see docs/nosuch.md", "x") == ["x: docs/nosuch.md does not exist"]
    assert doc_reference_errors("see docs/methods.md#no-such-section", "x") == [
        "x: docs/methods.md has no section #no-such-section"
    ]
    assert doc_reference_errors("(methods.md §4)", "x") == ["x: cites 'methods.md §', which is not in this repository"]
    assert doc_reference_errors("rules in docs/platform.md", "x")[-1].endswith("not in this repository")
    assert not resolves("kvtrain.runtime.cache.NoSuchThing")
    assert not resolves("kvtrain.sals_cache")
    assert resolves("kvtrain.runtime.cache.CompressedCache.for_model")
