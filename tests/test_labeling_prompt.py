"""The judging prompt and the yes/no -> P(yes) helpers (pure functions, no Ray)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raycache.labeling.prompt import (
    SYSTEM_MESSAGE,
    answer_of_token,
    judge_answer,
    judge_messages,
    p_yes_from_logprobs,
    p_yes_from_side_logprobs,
    pair_too_long,
    parse_yes_no,
)


def test_judge_messages_show_both_prompts_and_ask_yes_or_no():
    messages = judge_messages("What is the capital of France?", "France's capital city?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM_MESSAGE
    user = messages[1]["content"]
    assert "What is the capital of France?" in user and "France's capital city?" in user
    assert user.index("What is the capital") < user.index("France's capital city")
    assert "yes or no" in user.lower()


@pytest.mark.parametrize("token, side", [
    ("yes", "yes"), (" Yes", "yes"), ("YES", "yes"), ("\u2581yes", "yes"), ("\u0120No", "no"),
    ("no", "no"), (" no\n", "no"), ("y", None), ("yess", None), ("not", None), ("", None),
])
def test_answer_of_token(token, side):
    assert answer_of_token(token) == side


def test_p_yes_sums_spellings_per_side_and_normalises_over_the_two():
    candidates = [("Yes", math.log(0.5)), (" yes", math.log(0.1)), ("No", math.log(0.2)),
                  ("maybe", math.log(0.15))]
    assert p_yes_from_logprobs(candidates) == pytest.approx(0.6 / 0.8)


def test_p_yes_when_one_or_no_side_is_visible():
    assert p_yes_from_logprobs([("no", -0.01), ("The", -5.0)]) == 0.0
    assert p_yes_from_logprobs([("yes", -3.0)]) == 1.0
    assert p_yes_from_logprobs([("The", -0.1), ("I", -2.0)]) is None
    assert p_yes_from_logprobs([("yes", float("-inf")), ("no", -1.0)]) == 0.0


@given(st.lists(st.floats(-60, 0), min_size=1, max_size=4),
       st.lists(st.floats(-60, 0), min_size=1, max_size=4))
def test_p_yes_matches_direct_normalisation(yes, no):
    p_yes = sum(math.exp(v) for v in yes)
    p_no = sum(math.exp(v) for v in no)
    assert p_yes_from_side_logprobs(yes, no) == pytest.approx(p_yes / (p_yes + p_no), abs=1e-9)


def test_p_yes_is_stable_for_extreme_logprobs():
    assert p_yes_from_side_logprobs([-1000.0], [-1.0]) == pytest.approx(0.0, abs=1e-300)
    assert p_yes_from_side_logprobs([-1.0], [-1000.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("text, label", [
    ("yes", 1.0), ("Yes.", 1.0), ("  NO \n", 0.0), ("no.", 0.0),
    ("yes, but only partly", None), ("probably yes", None), ("y", None), ("", None),
    (None, None), ("yes..", None), ("Yes No", None),
])
def test_parse_yes_no_is_strict(text, label):
    assert parse_yes_no(text) == label


def test_pair_too_long_counts_both_prompts():
    assert not pair_too_long("a" * 10, "b" * 10, 20)
    assert pair_too_long("a" * 10, "b" * 11, 20)


def test_judge_answer_takes_logprobs_first_then_the_strict_text_parse():
    # the log-probs win over a text that says the opposite
    assert judge_answer([("yes", math.log(0.2)), ("no", math.log(0.6))], "yes") == (pytest.approx(0.25), None)
    assert judge_answer([("The", -0.1)], " No. ") == (0.0, None)  # no answer token: the text decides
    assert judge_answer([], "probably yes") == (None, "unparseable answer: 'probably yes'")
    assert judge_answer([], None) == (None, "unparseable answer: ''")
