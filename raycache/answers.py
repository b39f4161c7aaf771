"""When two reference answers count as the same: one SQuAD-style normaliser and answer set, shared by
the reference teacher (labeling) and the simulator's correctness (simulation.metrics / operating).

:func:`normalize_answer` lower-cases, drops punctuation and the articles a / an / the, and collapses
white space; :func:`answer_set` is the set of a cell's non-empty normalised answers. Two prompts share
an answer when their answer sets intersect.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any

__all__ = ["answer_set", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_set(value: Any) -> frozenset[str]:
    """Normalised, non-empty answers of a cell (list/array of str, a str, or missing: None / NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return frozenset()
    items = [value] if isinstance(value, str) else list(value)
    return frozenset(a for a in (normalize_answer(x) for x in items if isinstance(x, str)) if a)
