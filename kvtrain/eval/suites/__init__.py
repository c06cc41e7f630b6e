"""The evaluation suites, by name (`get_suite`): each in its own module, registered here."""

from __future__ import annotations

from kvtrain import ConfigError
from kvtrain.eval.suites.base import Suite, SuiteResult, kept_where_full_right, quality_ratio, relative_metrics


class UnknownSuiteError(ConfigError):
    """A suite name that is not registered; the message lists the registered ones."""


def _registry() -> dict[str, type[Suite]]:
    # Imported on first use: building the registry must not import torch-heavy modules before they are needed.
    from kvtrain.eval.suites.fidelity import FidelitySuite
    from kvtrain.eval.suites.instructions import InstructionsSuite
    from kvtrain.eval.suites.memory import MemorySuite
    from kvtrain.eval.suites.perplexity import LoyaltySuite, PerplexitySuite
    from kvtrain.eval.suites.reasoning import ReasoningSuite
    from kvtrain.eval.suites.retrieval import RetrievalSuite

    suites = [PerplexitySuite, LoyaltySuite, FidelitySuite, RetrievalSuite, InstructionsSuite, ReasoningSuite,
              MemorySuite]
    return {suite.name: suite for suite in suites}


SUITE_NAMES = ("perplexity", "loyalty", "fidelity", "retrieval", "instructions", "reasoning", "memory")


def get_suite(name: str) -> Suite:
    registry = _registry()
    if name not in registry:
        raise UnknownSuiteError(f"unknown suite {name!r}; suites: {', '.join(SUITE_NAMES)}")
    return registry[name]()


__all__ = ["SUITE_NAMES", "Suite", "SuiteResult", "UnknownSuiteError", "get_suite", "kept_where_full_right", "quality_ratio", "relative_metrics"]
