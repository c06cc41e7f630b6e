"""Each suite on a tiny model: runs under the full cache and a compressed one, batches change nothing, the
instruction fixes act on their spans, and bad names or options are refused by name."""

from __future__ import annotations

import math

import pytest

from kvtrain import ConfigError, KVCompressionConfig
from kvtrain.eval.generation import run_items
from kvtrain.eval.suites import UnknownSuiteError, get_suite
from kvtrain.eval.suites.instructions import InstructionsOptions, build_items
from tests.eval.conftest import evict_config

SMALL = {
    "perplexity": {"blocks": 1, "context_len": 48, "continuation_len": 16},
    "retrieval": {"lengths": [80], "depths": [0.5], "kinds": ["passkey", "copy"]},
    "instructions": {"prompts": 1, "max_new_tokens": 4, "fixes": ["none"]},
    "reasoning": {"chains": 1, "word_problems": 1, "max_new_tokens": 8},
    "memory": {"lengths": [32], "decode_steps": 2},
    "fidelity": {"blocks": 1, "block_len": 32},
}


@pytest.mark.parametrize("suite_name", sorted(SMALL))
def test_suite_runs_full_and_compressed(suite_name, tiny):
    model, tokenizer = tiny
    suite = get_suite(suite_name)
    options = suite.parse_options(SMALL[suite_name])
    quant = KVCompressionConfig.from_dict({"budget": None, "compression_ratio": 0.0, "selection": "per_layer",
                                           "quant": {"key_bits": 4, "value_bits": 4, "group_size": 16}})
    for config in (None, evict_config(), quant):
        result = suite.run(model, tokenizer, config, options)
        if suite_name == "fidelity" and config is not quant:
            assert result.skipped and not result.metrics  # nothing stored in reduced precision
            continue
        assert result.metrics and all(math.isfinite(v) for v in result.metrics.values())
        if suite.quality_metric:
            assert suite.quality_metric in result.metrics
    if suite_name == "memory":
        assert {"decode_speed_vs_dynamic_L32", "bytes_residual", "peak_rss_mib_L32"} <= set(result.metrics)


def test_a_batch_answers_as_each_item_alone(tiny):
    model, tokenizer = tiny
    suite = get_suite("retrieval")
    items = suite.build_items(tokenizer, suite.parse_options({"lengths": [96], "depths": [0.1, 0.5, 0.9],
                                                              "kinds": ["passkey"]}))
    config = evict_config(compression_ratio=0.6, schedule={"interval": 2})  # events during the answer too
    together = run_items(model, tokenizer, items, config, batch_size=3)
    alone = [run_items(model, tokenizer, [item], config)[0] for item in items]
    assert [r.response for r in together] == [r.response for r in alone]
    assert [r.bytes.fraction for r in together] == [r.bytes.fraction for r in alone]


def test_whitelist_keeps_the_defence_key_and_fair_splits_the_budget(tiny):
    model, tokenizer = tiny
    suite = get_suite("instructions")
    options = suite.parse_options({"prompts": 1, "max_new_tokens": 2})
    result = suite.run(model, tokenizer, evict_config(compression_ratio=0.6), options)
    rates = result.extra["keep_rates"]
    assert set(rates) == {"none", "whitelist", "fair"} and result.extra["skipped"] == {"none": 0, "whitelist": 0,
                                                                                        "fair": 0}
    assert rates["whitelist"]["defence_key"] == [1.0, 1.0]  # every layer kept the whole phrase
    assert min(rates["none"]["defence_key"]) < 1.0  # without the fix it is not kept whole
    assert {"fair_instruction_pass_rate", "whitelist_leak_directive", "keep_directive"} <= set(result.metrics)
    # at 95% eviction the key phrase plus sinks and recent tokens exceed the budget: the fix is skipped, counted
    result = suite.run(model, tokenizer, evict_config(compression_ratio=0.95), options)
    assert result.extra["skipped"]["whitelist"] == 2 and "whitelist_instruction_pass_rate" not in result.metrics


def test_instruction_items_name_their_spans(tiny):
    _, tokenizer = tiny
    items = build_items(tokenizer, InstructionsOptions(prompts=1, orders=("defence_first", "defence_last")))
    first, last = items[0], items[2]
    names = [n for n, _ in first.pieces[: first.prefill_pieces]]
    assert names.index("defence_key") < names.index("preamble")
    names = [n for n, _ in last.pieces[: last.prefill_pieces]]
    assert names.index("defence_key") > names.index("preamble")
    assert [c.checker for c in items[1].checks] == ["rouge_l_recall", "rouge_l_recall", "refusal"]


def test_chain_items_carry_their_derivation(tiny):
    _, tokenizer = tiny
    suite = get_suite("reasoning")
    chain = suite.build_items(tokenizer, suite.parse_options({"chains": 1, "word_problems": 0}))[0]
    answer, steps = chain.checks
    start, step, times = [int(w.strip(",")) for w in chain.pieces[1][1].split() if w.strip(",").isdigit()]
    assert answer.reference == str(start + step * times)
    assert steps.score(steps.reference) == 1.0 and steps.reference.count("=") == times


def test_unknown_suite_and_option_are_named():
    with pytest.raises(UnknownSuiteError, match=r"unknown suite 'retreival'; suites: perplexity, loyalty"):
        get_suite("retreival")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['lenghts'\] for suite 'retrieval'.*'lengths'"):
        get_suite("retrieval").parse_options({"lenghts": [1]})
    with pytest.raises(ConfigError, match=r"kinds=\('haystack',\): must be a list of strings among passkey"):
        get_suite("retrieval").parse_options({"kinds": ["haystack"]})
