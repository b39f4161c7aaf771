"""The judging prompt shared by every LLM teacher, and how its yes/no answer becomes P(yes).

The teacher sees both prompts and answers one word, ``yes`` or ``no``: can a single response fully
and correctly answer both? The soft label is P(yes) normalised over the two answers, taken from
the answer token's probabilities (``p_yes_from_logprobs``). Only where a backend returns text alone
is the text parsed, strictly (``parse_yes_no``): anything but a bare yes/no is an error, never a guess.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

SYSTEM_MESSAGE = (
    "You decide whether two requests sent to an AI assistant can share one response. "
    "Answer yes only if a single response would fully and correctly answer both requests: "
    "they ask for the same information, and an answer written for one is complete and right "
    "for the other. Answer no if they differ in any way that changes the correct response "
    "(a different entity, attribute, number, time, constraint or format). "
    "Reply with exactly one word: yes or no."
)

USER_TEMPLATE = (
    "Request A:\n{prompt_a}\n\n"
    "Request B:\n{prompt_b}\n\n"
    "Can one response fully and correctly answer both requests? Answer yes or no."
)

ANSWERS = ("yes", "no")
# Spellings whose first token counts as evidence for an answer (tokenizers differ on case and on
# a leading space); see ``answer_token_ids``.
ANSWER_VARIANTS = {
    "yes": ("yes", " yes", "Yes", " Yes", "YES", " YES"),
    "no": ("no", " no", "No", " No", "NO", " NO"),
}
# Word-start markers that tokenizers put on a token's text (SentencePiece, byte-level BPE).
_WORD_START_MARKERS = "\u2581\u0120"

CONTEXT_TOO_LONG = "context too long"


def judge_messages(prompt_a: str, prompt_b: str) -> list[dict[str, str]]:
    """The chat messages (OpenAI format: system + user) that ask the teacher about one pair."""
    return [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": USER_TEMPLATE.format(prompt_a=prompt_a, prompt_b=prompt_b)},
    ]


def pair_too_long(prompt_a: str, prompt_b: str, max_prompt_chars: int) -> bool:
    """True when the two prompts together exceed ``max_prompt_chars`` characters."""
    return len(prompt_a) + len(prompt_b) > max_prompt_chars


def token_word(token: str) -> str:
    """A token's text without surrounding space or word-start marker, lower case (" Yes" -> "yes")."""
    return token.strip().lstrip(_WORD_START_MARKERS).strip().lower()


def answer_of_token(token: str) -> Optional[str]:
    """'yes' / 'no' when a token's text is that answer (any case, leading space or marker), else None."""
    word = token_word(token)
    return word if word in ANSWERS else None


def p_yes_from_logprobs(candidates: Iterable[tuple[str, float]]) -> Optional[float]:
    """P(yes) / (P(yes) + P(no)) from (token text, log-probability) alternatives of one position.

    Every alternative that spells an answer counts for it (``Yes`` and `` yes`` both for yes).
    Returns None when neither answer is among the alternatives; 1.0 or 0.0 when only one is.
    """
    side_logprobs: dict[str, list[float]] = {"yes": [], "no": []}
    for token, logprob in candidates:
        side = answer_of_token(token)
        if side is not None and logprob is not None and math.isfinite(logprob):
            side_logprobs[side].append(float(logprob))
    return p_yes_from_side_logprobs(side_logprobs["yes"], side_logprobs["no"])


def p_yes_from_side_logprobs(yes: Iterable[float], no: Iterable[float]) -> Optional[float]:
    """sigmoid(logsumexp(yes) − logsumexp(no)); None when both sides are empty."""
    lse_yes, lse_no = _logsumexp(yes), _logsumexp(no)
    if lse_yes is None and lse_no is None:
        return None
    if lse_no is None:
        return 1.0
    if lse_yes is None:
        return 0.0
    diff = lse_yes - lse_no
    if diff >= 0:
        return 1.0 / (1.0 + math.exp(-diff))
    e = math.exp(diff)
    return e / (1.0 + e)


def _logsumexp(values: Iterable[float]) -> Optional[float]:
    values = list(values)
    if not values:
        return None
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def parse_yes_no(text: Optional[str]) -> Optional[float]:
    """Strict parse of a text-only answer: 1.0 for yes, 0.0 for no, None for anything else.

    Accepted: the bare word in any case, with surrounding whitespace and at most one trailing
    full stop (``"Yes."``). Rejected: ``"yes, but..."``, ``"probably yes"``, ``"y"``, empty text.
    """
    if not isinstance(text, str):
        return None
    word = text.strip()
    if word.endswith("."):
        word = word[:-1]
    word = word.strip().lower()
    if word == "yes":
        return 1.0
    if word == "no":
        return 0.0
    return None


def describe_answer(text: Optional[str], limit: int = 80) -> str:
    """A short, safe rendering of a teacher's text for an error message."""
    shown = repr(text if text is not None else "")
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def judge_answer(first_token: Iterable[tuple[str, float]],
                 text: Optional[str]) -> tuple[Optional[float], Optional[str]]:
    """A teacher's answer -> judgement ``(P(yes), None)`` or ``(None, error)``: from the first
    answer token's (token text, log-probability) alternatives (:func:`p_yes_from_logprobs`), else
    the strict parse of the answer's text (:func:`parse_yes_no`); neither gives "unparseable answer"."""
    p = p_yes_from_logprobs(first_token)
    if p is None:
        p = parse_yes_no(text)
        if p is None:
            return None, f"unparseable answer: {describe_answer(text)}"
    return p, None
