"""What a suite is: deterministic items (if it has any), a run under one cache configuration, and a result.

A suite's options are a dataclass with defaults; `parse_options` builds it from a mapping (a YAML grid, or
`--set KEY=VALUE` flags) and names any key it does not know. A run under `config=None` is the full cache,
the reference every compressed run is compared with (`relative_metrics`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvtrain.config import ConfigError
from kvtrain.eval import metrics as M
from kvtrain.eval.intervals import paired_difference


@dataclass
class SuiteResult:
    """`metrics`: finite numbers (checked); `items`: per item its id, response and check scores; `extra`:
    structured data for plots (per layer, per span); `skipped`: why the suite does not apply to a config."""

    metrics: dict[str, float] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def __post_init__(self) -> None:
        for name, value in self.metrics.items():
            self.metrics[name] = M.finite(value, f"metric {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SuiteResult":
        return cls(**data)


class Suite:
    """Subclasses set `name`, `Options` and `quality_metric`, and implement `run` (and `build_items` when
    the suite is made of items)."""

    name: ClassVar[str]
    Options: ClassVar[type]
    # The metric plotted as quality against cache bytes (None: the suite measures no quality).
    quality_metric: ClassVar[str | None] = None
    quality_lower_is_better: ClassVar[bool] = False
    # Whether the quality ratio to the full cache enters the overall score (task suites, not diagnostics).
    in_overall: ClassVar[bool] = False
    has_items: ClassVar[bool] = False  # made of prompts (`build_items`): exportable as JSONL
    # The checks (name prefixes) whose scores make the quality: pooled on the items the full cache gets right.
    quality_checks: ClassVar[tuple[str, ...]] = ()

    def build_items(self, tokenizer, options) -> list:
        raise ValueError(f"suite {self.name!r} has no items to export")

    def run(self, model, tokenizer, config, options, *, progress: bool = False) -> SuiteResult:
        raise NotImplementedError

    def longest_sequence(self, options) -> tuple[int, str] | None:
        """(tokens, the options that set them) of the longest sequence a run feeds the model, so that a length
        beyond the model's positions or the machine's memory is refused before the weights load; None when the
        suite's sequences are short prompts whose length only the tokenizer knows."""
        return None

    def breakdown(self, result: SuiteResult, full: SuiteResult | None) -> list[dict[str, Any]]:
        """Rows worth a table of their own next to the metrics (e.g. per task); none by default."""
        return []

    def parse_options(self, values: dict[str, Any] | None, source: str = "options") -> Any:
        """The options from a mapping: unknown keys, wrong types and values out of range are refused naming the
        option (`source` names where the mapping came from, e.g. ``--set``)."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown} for suite {self.name!r}; "
                              f"its options: {sorted(known)}")
        for key, value in values.items():
            if isinstance(getattr(self.Options(), key), tuple) and isinstance(value, list):
                values[key] = tuple(value)
        try:
            return self.Options(**values)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: suite {self.name!r}: {err}") from None


def relative_metrics(result: SuiteResult, full: SuiteResult) -> dict[str, float | None]:
    """Against the full-cache result of the same suite: per check, the mean score on the items the full cache
    gets right; the agreement of the responses with the full cache's (EffiVLM loyalty). Rows run under a
    variant (`meta.fix`, e.g. the instruction suite's fixes) are compared on their own, prefixed `<fix>_`."""
    full_by_id = {item["id"]: item for item in full.items}
    variants: dict[str, list[dict[str, Any]]] = {}
    for item in result.items:
        variants.setdefault(item.get("meta", {}).get("fix", "none"), []).append(item)
    out: dict[str, float | None] = {}
    for variant, rows in variants.items():
        prefix = "" if variant == "none" else f"{variant}_"
        missing = [row["id"] for row in rows if row.get("item", row["id"]) not in full_by_id]
        if missing:
            raise ValueError(f"items {missing[:3]} have no full-cache result to compare with")
        reference = [full_by_id[row.get("item", row["id"])] for row in rows]
        for check in sorted({name for row in rows for name in row["scores"]}):
            pairs = [(row["scores"][check], ref["scores"][check]) for row, ref in zip(rows, reference)
                     if check in row["scores"]]
            out[f"{prefix}{check}_where_full_right"] = M.accuracy_where_reference_right(*zip(*pairs))
            out.update(_paired(f"{prefix}{check}", *zip(*pairs)))
        out[f"{prefix}agreement_with_full"] = M.agreement([row["response"] for row in rows],
                                                          [ref["response"] for ref in reference])
    return out


def _paired(name: str, scores, reference_scores) -> dict[str, float]:
    """`<name>_minus_full` over the same items, its paired-bootstrap 95% interval, and `_real` (1.0 when the
    interval excludes 0: a difference the items can tell from noise)."""
    diff = paired_difference(list(scores), list(reference_scores))
    return {f"{name}_minus_full": diff["difference"], f"{name}_minus_full_ci95_low": diff["low"],
            f"{name}_minus_full_ci95_high": diff["high"], f"{name}_minus_full_real": float(diff["real"])}


def block_differences(result: SuiteResult, full: SuiteResult) -> dict[str, float]:
    """For suites scored over blocks (`extra.per_block`, the same blocks in both runs): the NLL difference to
    the full cache, paired over blocks, with its interval."""
    mine, theirs = result.extra.get("per_block"), full.extra.get("per_block")
    if not mine or not theirs or len(mine) != len(theirs):
        return {}
    return _paired("nll", [row["nll"] for row in mine], [row["nll"] for row in theirs])


def kept_where_full_right(suite: "Suite", result: SuiteResult, full: SuiteResult) -> float | None:
    """Mean score of the suite's quality checks over the (item, check) pairs the full cache gets right (the
    plain rows, not fix variants); None when it gets none right or the suite has no such checks."""
    full_by_id = {item["id"]: item for item in full.items}
    pairs = [(row["scores"][check], full_by_id[row["id"]]["scores"][check])
             for row in result.items if row.get("meta", {}).get("fix", "none") == "none" and row["id"] in full_by_id
             for check in row["scores"] if check.startswith(suite.quality_checks) and suite.quality_checks]
    if not pairs:
        return None
    return M.accuracy_where_reference_right(*zip(*pairs))


def quality_ratio(suite: "Suite", result: SuiteResult, full: SuiteResult) -> float | None:
    """Quality under compression relative to the full cache (1 = as good; for a lower-is-better metric such as
    perplexity, full / compressed). None when the suite has no quality or either run lacks it."""
    name = suite.quality_metric
    if name is None or name not in result.metrics or name not in full.metrics:
        return None
    if suite.quality_lower_is_better:
        return M.score_ratio(full.metrics[name], result.metrics[name])
    return M.score_ratio(result.metrics[name], full.metrics[name])
