"""Every checker on hand-made responses with hand-computed scores; the registry's errors; no torch import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvtrain.errors import UserError
from kvtrain.eval.checkers import UnknownCheckerError, get_checker, run_checker


@pytest.mark.parametrize(
    "name,response,reference,params,expected",
    [
        # retrieval
        ("first_number", " 48213. Remember it.", "48213", {}, 1.0),
        ("first_number", " is 4821 and 48213", "48213", {}, 0.0),  # the first number counts
        ("first_number", " no digits here", "48213", {}, 0.0),
        ("first_word", " Saffron, of course", "saffron", {}, 1.0),
        ("first_word", " the saffron", "saffron", {}, 0.0),
        ("first_word", "   ", "saffron", {}, 0.0),
        ("verbatim_prefix", " with the same  sign as\nits second operand", "with the same sign as its", {}, 1.0),
        ("verbatim_prefix", " with a same sign", "with the same", {}, 0.0),
        ("verbatim_prefix", " with the other", "with the same", {"words": 2}, 1.0),
        # instructions
        ("lowercase", "all lower, even 2 digits.", None, {}, 1.0),
        ("lowercase", "One capital", None, {}, 0.0),
        ("lowercase", "1234", None, {}, 0.0),  # no letters: not an answer in lower case
        ("uppercase", "ALL CAPS!", None, {}, 1.0),
        ("uppercase", "ALL CAPs", None, {}, 0.0),
        ("no_commas", "no commas here", None, {}, 1.0),
        ("no_commas", "one, comma", None, {}, 0.0),
        ("starts_with", "  certainly, here", None, {"phrase": "Certainly"}, 1.0),
        ("starts_with", "Sure. Certainly", None, {"phrase": "Certainly"}, 0.0),
        ("ends_with", "Bye. Have a nice day.  \n", None, {"phrase": "Have a nice day."}, 1.0),
        ("ends_with", "Have a nice day. Bye.", None, {"phrase": "Have a nice day."}, 0.0),
        ("includes_word", "The Ocean, the ocean!", None, {"word": "ocean", "times": 2}, 1.0),
        ("includes_word", "oceanic views", None, {"word": "ocean"}, 0.0),  # whole words only
        ("excludes_word", "quite good", None, {"word": "very"}, 1.0),
        ("excludes_word", "Very good", None, {"word": "very"}, 0.0),
        ("max_words", "one two three", None, {"limit": 3}, 1.0),
        ("max_words", "one two three four", None, {"limit": 3}, 0.0),
        ("max_words", "  ", None, {"limit": 3}, 0.0),
        ("quoted", ' "wrapped" ', None, {}, 1.0),
        ("quoted", '"half', None, {}, 0.0),
        ("refusal", "Sorry, I can\u2019t assist with that request.", None, {}, 1.0),
        ("refusal", "Sure: here they are", None, {}, 0.0),
        # reasoning
        ("math_answer", "3 + 4 = 7. The answer is 7.", "7", {}, 1.0),
        ("math_answer", "The answer is 7.0", "7", {}, 1.0),  # math-verify compares values
        ("math_answer", "The answer is 8. The answer is 7.", "7", {}, 0.0),  # the first stated answer counts
        ("math_answer", "7 + 0 = 7", "7", {}, 0.0),  # no answer stated
    ],
)
def test_checker_scores(name, response, reference, params, expected):
    assert run_checker(name, response, reference, params) == expected


def test_chain_steps_counts_the_right_steps_before_the_first_slip():
    reference = "5 + 2 = 7. 7 + 2 = 9. 9 + 2 = 11. 11 + 2 = 13."
    assert run_checker("chain_steps", reference, reference) == 1.0
    # steps 1 and 2 right, step 3 wrong (12), step 4 right again but after the slip: 2 of 4
    assert run_checker("chain_steps", "5 + 2 = 7. 7 + 2 = 9. 9 + 2 = 12. 11 + 2 = 13.", reference) == 0.5
    assert run_checker("chain_steps", "5 + 2 = 7.", reference) == 0.25  # missing steps count as wrong
    with pytest.raises(ValueError, match="no equation"):
        run_checker("chain_steps", "x", "no equations")


def test_rouge_l_recall_by_hand():
    # reference tokens: the cat sat on the mat (6); response: well the cat lay on a mat today (8)
    # longest common subsequence: the, cat, on, mat = 4  ->  recall 4/6 (precision would be 4/8)
    assert run_checker("rouge_l_recall", "well the cat lay on a mat today", "the cat sat on the mat") == \
        pytest.approx(4 / 6)
    # case and punctuation are ignored by ROUGE's tokenizer; order matters: LCS of (a b c d) in (d c b a) is 1
    assert run_checker("rouge_l_recall", "The CAT, sat on the mat!", "the cat sat on the mat") == 1.0
    assert run_checker("rouge_l_recall", "d c b a", "a b c d") == pytest.approx(1 / 4)
    assert run_checker("rouge_l_recall", "", "a b") == 0.0


def test_unknown_checker_and_bad_parameters_are_named():
    with pytest.raises(UnknownCheckerError, match=r"unknown checker 'rouge'.*rouge_l_recall"):
        get_checker("rouge")
    assert issubclass(UnknownCheckerError, UserError)  # a one-line message at the command line
    with pytest.raises(ValueError, match=r"checker 'max_words': bad parameters \['limt'\]"):
        run_checker("max_words", "a b", None, {"limt": 3})
    with pytest.raises(ValueError, match="needs a reference"):
        run_checker("first_number", "1")


def test_checkers_import_without_torch():
    code = "import sys, kvtrain.eval.checkers, kvtrain.eval.metrics; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_all_present_is_ruler_string_match():
    from kvtrain.eval.checkers import run_checker

    assert run_checker("all_present", " 1234567 and 7654321.", "7654321|1234567") == 1.0  # any order
    assert run_checker("all_present", " They are ALPHA, beta", "alpha|beta") == 1.0  # case ignored
    assert run_checker("all_present", " 1234567 only", "7654321|1234567") == 0.0  # one value missing
    assert run_checker("all_present", "", "x") == 0.0
    with pytest.raises(ValueError, match="no value"):
        run_checker("all_present", "x", " | ")
