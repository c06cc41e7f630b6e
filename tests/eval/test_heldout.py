"""No evaluation text appears in the training split (checked on shared 13-word runs)."""

from __future__ import annotations

import pytest

from kvtrain.data import load_texts
from kvtrain.eval.heldout import NGRAM, check_not_in_training, heldout_blocks, heldout_paragraphs, seen_in_training
from kvtrain.eval.suites import get_suite


def test_a_training_passage_is_caught_and_heldout_paragraphs_pass():
    training_words = load_texts(None, "train")[3].split()
    passage = " ".join(["An", "introduction:"] + training_words[10 : 10 + NGRAM + 2])
    with pytest.raises(ValueError, match=r"evaluation text #1 repeats 3 13-word run\(s\) of the training split"):
        check_not_in_training(["fresh words only", passage])
    paragraphs = heldout_paragraphs()
    assert len(paragraphs) > 20 and sum(len(p.split()) for p in paragraphs) > 1500
    check_not_in_training(paragraphs)
    assert seen_in_training(" ".join(training_words[:NGRAM - 1])) == []  # shorter than a run: cannot match


@pytest.mark.parametrize("suite_name,options", [
    ("retrieval", {"lengths": [128, 256]}), ("instructions", {"prompts": 3}), ("reasoning", {}),
])
def test_built_in_items_hold_no_training_text(suite_name, options, tiny):
    _, tokenizer = tiny
    suite = get_suite(suite_name)
    items = suite.build_items(tokenizer, suite.parse_options(options))
    check_not_in_training([item.prompt for item in items], f"{suite_name} prompt")


def test_heldout_measurement_blocks_hold_no_training_text():
    """The blocks the quickstart, distillation's loyalty and the distillation benchmark measure on (4 and 6 blocks of
    512 SmolLM2 tokens from the embedded held-out split), decoded back to text: no 13-word run of the training split.
    The unfiltered held-out split fails this check."""
    from transformers import AutoTokenizer

    from kvtrain.models.embedded import embedded_model_dir, prepare_model

    prepare_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    blocks = heldout_blocks(tokenizer, None, "heldout", 512, 6)
    assert blocks.shape == (6, 512)
    check_not_in_training([tokenizer.decode(block) for block in blocks], "held-out block")
    unfiltered = load_texts(None, "heldout")
    with pytest.raises(ValueError, match="repeats"):
        check_not_in_training(["\n\n".join(unfiltered)])
