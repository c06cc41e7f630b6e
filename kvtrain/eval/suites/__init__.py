"""The evaluation suites, by name (`get_suite`): each in its own module, registered here."""

from __future__ import annotations

from kvtrain.config import ConfigError
from kvtrain.eval.suites.base import Suite, SuiteResult, kept_where_full_right, quality_ratio, relative_metrics
from kvtrain.eval.suites.fidelity import FidelitySuite
from kvtrain.eval.suites.instructions import InstructionsSuite
from kvtrain.eval.suites.memory import MemorySuite
from kvtrain.eval.suites.perplexity import LoyaltySuite, PerplexitySuite
from kvtrain.eval.suites.reasoning import ReasoningSuite
from kvtrain.eval.suites.retrieval import RetrievalSuite
from kvtrain.eval.suites.ruler import RulerSuite


class UnknownSuiteError(ConfigError):
    """A suite name that is not registered; the message lists the registered ones."""


SUITES: dict[str, type[Suite]] = {
    suite.name: suite
    for suite in (PerplexitySuite, LoyaltySuite, FidelitySuite, RetrievalSuite, InstructionsSuite, ReasoningSuite,
                  MemorySuite, RulerSuite)
}
SUITE_NAMES = tuple(SUITES)


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UnknownSuiteError(f"unknown suite {name!r}; suites: {', '.join(SUITE_NAMES)}")
    return SUITES[name]()


__all__ = ["SUITES", "SUITE_NAMES", "Suite", "SuiteResult", "UnknownSuiteError", "get_suite", "kept_where_full_right",
           "quality_ratio", "relative_metrics"]
