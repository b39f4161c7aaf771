"""Embedded default workload: a seeded, deterministic single-turn QA dataset.

The workload is built from a small hand-written fact table (``FACTS``) covering
several domains (countries, chemical elements, books, companies, animals,
cities, programming languages, inventions).  Every (domain, entity, attribute)
triple is one *group*: all phrasings of it share one response, while

* the same phrasing template applied to another entity, and
* the same entity asked about another attribute

need a different response.  Each attribute has six phrasing slots: 0-1 are
plain frames shared by all attributes ("What is the capital of {e}?"), 2-5 are
idiomatic paraphrases ("Where is {e}'s seat of government?").  Slots 1-5 also
carry a per-domain user preamble ("Quick geography question before my quiz
...") that is the same for every entity and attribute at that slot.  So hard
negatives (same slot, another entity or attribute) are lexically almost
identical, while positives (two slots of one group) differ in both wording and
preamble.  Off-the-shelf topic embeddings (all-MiniLM-L6-v2) reach only about
0.70 ROC-AUC on the default pairs; a cache encoder has to learn to do better.

Public API: :data:`FACTS`, :data:`DOMAINS`, :func:`generate_prompts`,
:func:`generate_pairs`, :func:`generate_stream`, :func:`write_default_dataset`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

__all__ = [
    "Domain",
    "DOMAINS",
    "FACTS",
    "generate_prompts",
    "generate_pairs",
    "generate_stream",
    "write_default_dataset",
]


@dataclass(frozen=True)
class Domain:
    """Schema of one domain.

    ``attributes``: attribute names, in the column order of the raw table.
    ``templates[attr]``: phrasings with an ``{e}`` slot for the entity.
    ``responses[attr]``: answer sentence with ``{e}`` and ``{v}`` slots.
    ``contexts[i]``: user chatter wrapped around template ``i`` of every
    attribute: a preamble, or a pattern with a ``{q}`` slot; "" for none.
    """

    attributes: tuple[str, ...]
    templates: Mapping[str, tuple[str, ...]]
    responses: Mapping[str, str]
    contexts: tuple[str, ...] = ()


# ---------------------------------------------------------------------------
# The fact tables and phrasings live in the package data file
# ``raycache/data_files/workload.json`` (its "about" field describes the format):
# ``tables[domain]``: one entity per row, fields separated by "|" in the order of
# the domain's ``attributes`` after the entity name; a field may list accepted
# aliases separated by ";" -- the first one is the canonical answer used in
# responses (elements: atomic number|symbol|name, the period derived from the
# number).  ``domains[domain]``: six phrasing slots per attribute (0-1 plain
# frames, 2-5 idiomatic); the domain's ``contexts[i]`` is wrapped around slot i
# of every attribute.
# ---------------------------------------------------------------------------

_DATA_FILE = "workload.json"


def _load_data() -> tuple[dict[str, Domain], dict[str, list[str]]]:
    doc = json.loads((resources.files("raycache") / "data_files" / _DATA_FILE).read_text(encoding="utf-8"))
    domains = {
        name: Domain(
            attributes=tuple(d["attributes"]),
            templates={a: tuple(t) for a, t in d["templates"].items()},
            responses=dict(d["responses"]),
            contexts=tuple(d["contexts"]),
        )
        for name, d in doc["domains"].items()
    }
    return domains, {name: list(rows) for name, rows in doc["tables"].items()}


DOMAINS: dict[str, Domain]
DOMAINS, _TABLES = _load_data()


def _period(z: int) -> int:
    for period, last in enumerate((2, 10, 18, 36, 54, 86, 118), start=1):
        if z <= last:
            return period
    raise ValueError(z)


def _parse(lines: list[str], n_fields: int) -> list[list[str]]:
    rows = [line.split("|") for line in lines]
    for row in rows:
        if len(row) != n_fields:
            raise ValueError(f"bad fact row: {row}")
    return rows


def _build_facts() -> dict[str, dict[str, dict[str, tuple[str, ...]]]]:
    def aliases(field: str) -> tuple[str, ...]:
        out: list[str] = []
        for alias in (a.strip() for a in field.split(";")):
            out.append(alias)
            if alias.startswith("the "):  # "the Bund" is also accepted as "Bund"
                out.append(alias[4:])
        return tuple(dict.fromkeys(a for a in out if a))

    facts: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {}
    for domain, spec in DOMAINS.items():
        if domain == "element":
            facts[domain] = {
                name.split(";")[0]: {
                    "symbol": (sym,),
                    "atomic_number": (z,),
                    "period": (str(_period(int(z))),),
                }
                for z, sym, name in _parse(_TABLES[domain], 3)
            }
            continue
        rows = _parse(_TABLES[domain], 1 + len(spec.attributes))
        facts[domain] = {
            row[0]: {a: aliases(v) for a, v in zip(spec.attributes, row[1:])} for row in rows
        }
    return facts


#: ``FACTS[domain][entity][attribute]`` -> tuple of accepted answers; the first
#: one is canonical (used in responses), the rest are aliases.  Entity names
#: are unique across all domains.
FACTS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = _build_facts()

_ENTITY_RANK = {(d, e): k for d, ents in FACTS.items() for k, e in enumerate(ents)}
_NEAR_ENTITIES = 4  # entity-swap negatives use one of the 4 nearest table neighbours

_MAX_MISSES = 2000  # consecutive failed draws before a pair kind is given up

_PROMPT_COLUMNS = ["prompt", "answers", "group", "domain", "entity", "attribute", "template", "context",
                   "split"]
_PAIR_COLUMNS = ["prompt_a", "prompt_b", "label", "group_a", "group_b", "answers_a", "answers_b"]
_STREAM_COLUMNS = ["prompt", "group", "answers", "response"]


def _cap(text: str) -> str:
    """Upper-case the first letter, leaving names like "eBay" alone."""
    if len(text) > 1 and text[1].isupper():
        return text
    return text[:1].upper() + text[1:]


def _phrase(spec: Domain, template: str, slot: int, entity: str) -> str:
    """Template ``template`` for ``entity`` wrapped in the domain's context number ``slot``."""
    question = _cap(template.format(e=entity))
    context = spec.contexts[slot] if 0 <= slot < len(spec.contexts) else ""
    if not context:
        return question
    if "{q}" in context:
        return context.format(q=question)
    if context.endswith(":") and not template.startswith("{e}"):
        question = question[:1].lower() + question[1:]
    return f"{context} {question}"


def _group_id(domain: str, entity: str, attribute: str) -> str:
    return f"{domain}:{entity}:{attribute}"


def _add_typo(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) > 3 and w.isalpha()]
    if not candidates:
        return text
    i = int(rng.choice(candidates))
    w = words[i]
    j = int(rng.integers(0, len(w) - 1))
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def _noisy(text: str, rng: np.random.Generator, noise: bool, typo_rate: float) -> str:
    """Light, seeded surface noise that never changes the meaning."""
    draws = rng.random(4)
    if noise:
        if draws[0] < 0.1 and text.endswith("."):
            text = text[:-1] + ", please."
        if draws[1] < 0.1:
            text = text.rstrip("?.")
        if draws[2] < 0.1:
            text = text.lower()
    if draws[3] < typo_rate:
        text = _add_typo(text, rng)
    return text


#: Phrasings of the train split: template slot i wrapped in context i (context 0 is none).
TRAIN_PHRASINGS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2))
#: Phrasings of the held-out (val and test) splits: the three idiomatic templates and their
#: contexts that the train split never uses (slot i in context i).
HELDOUT_PHRASINGS: tuple[tuple[int, int], ...] = ((3, 3), (4, 4), (5, 5))
#: Without holdout (``holdout_phrasings=False``) every split uses all six diagonal slots.
ALL_PHRASINGS: tuple[tuple[int, int], ...] = tuple((t, t) for t in range(6))

SPLITS = ("train", "val", "test")


def phrasings_of(split: str, holdout_phrasings: bool = True) -> tuple[tuple[int, int], ...]:
    """(template slot, context slot) pairs a split's prompts are written with."""
    if not holdout_phrasings:
        return ALL_PHRASINGS
    return TRAIN_PHRASINGS if split == "train" else HELDOUT_PHRASINGS


def generate_prompts(
    seed: int = 0,
    phrasings_per_group: int | None = None,
    *,
    noise: bool = True,
    typo_rate: float = 0.0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    holdout_phrasings: bool = True,
) -> pd.DataFrame:
    """Expand the fact table into one row per (group, phrasing).

    Columns: ``prompt`` (str), ``answers`` (list[str], canonical answer first),
    ``group`` ("domain:entity:attribute"), ``domain``, ``entity``,
    ``attribute``, ``template`` (int index into
    ``DOMAINS[domain].templates[attribute]``), ``context`` (int index into
    ``DOMAINS[domain].contexts``; 0 is no context) and ``split``
    ("train"/"val"/"test").

    Entities are split per domain: a seeded ``test_fraction`` (~20%) of each
    domain's entities go to "test" and ``val_fraction`` (~10%) to "val", so no
    entity -- hence no group -- appears in two splits.  With
    ``holdout_phrasings`` (the default) the splits are also written differently:
    train prompts use template slots 0-3, each in its own context
    (:data:`TRAIN_PHRASINGS`, 4 per group); val and test prompts use slots 4-5,
    plain and in contexts 4-5 (:data:`HELDOUT_PHRASINGS`, 6 per group), which
    training never sees.  So a fine-tuned encoder is scored on wordings and
    preambles it was not fitted to.  ``holdout_phrasings=False`` writes every
    split with all six slots (template i in context i).
    ``phrasings_per_group=None`` keeps every phrasing of the split; an int
    keeps a seeded sample of that many per group.  ``noise`` adds light
    variation (lowercase, ", please", dropped final punctuation, each ~10%);
    ``typo_rate`` (0 by default) swaps two adjacent letters in that fraction
    of prompts.
    """
    # Independent streams, so that noise settings never move the split and the
    # phrasing sample.
    split_rng, pick_rng, noise_rng = (np.random.default_rng([seed, k]) for k in range(3))
    rows = []
    for domain, spec in DOMAINS.items():
        entities = list(FACTS[domain])
        n_test = max(1, int(round(test_fraction * len(entities))))
        n_val = int(round(val_fraction * len(entities)))
        order = split_rng.permutation(len(entities))
        split_of = {entities[i]: "test" for i in order[:n_test]}
        split_of.update({entities[i]: "val" for i in order[n_test:n_test + n_val]})
        for entity in entities:
            split = split_of.get(entity, "train")
            phrasings = phrasings_of(split, holdout_phrasings)
            for attribute in spec.attributes:
                templates = spec.templates[attribute]
                chosen = [(t, c) for t, c in phrasings if t < len(templates)]
                if phrasings_per_group is not None:
                    k = min(max(1, int(phrasings_per_group)), len(chosen))
                    chosen = [chosen[int(i)] for i in sorted(pick_rng.choice(len(chosen), size=k, replace=False))]
                answers = list(FACTS[domain][entity][attribute])
                group = _group_id(domain, entity, attribute)
                for t, c in chosen:
                    text = _noisy(_phrase(spec, templates[t], c, entity), noise_rng, noise, typo_rate)
                    rows.append((text, list(answers), group, domain, entity, attribute, t, c, split))
    return pd.DataFrame(rows, columns=_PROMPT_COLUMNS)


def _pick(rng: np.random.Generator, items) -> int:
    return int(items[int(rng.integers(len(items)))])


def generate_pairs(
    prompts: pd.DataFrame,
    n_pairs: int,
    seed: int = 0,
    hard_fraction: float = 0.7,
) -> pd.DataFrame:
    """Sample labelled prompt pairs from ``prompts`` (call it once per split).

    Columns: ``prompt_a``, ``prompt_b``, ``label`` (1.0 iff same group, else
    0.0), ``group_a``, ``group_b``, ``answers_a``, ``answers_b``; ``n_pairs``
    rows unless the frame is too small to supply that many distinct pairs.

    Half the pairs are positives (two different phrasings of one group).  Of the
    negatives, ``hard_fraction`` are hard, split evenly between *entity swaps*
    (same domain, attribute, template and context, another entity: "capital of
    France" vs "capital of Spain") and *attribute swaps* (same entity, template
    slot and context, another attribute: "capital of France" vs "currency of
    France").  Entity swaps prefer a neighbouring entity in the fact table (a
    related one).  The remaining negatives are random pairs of different
    groups, half drawn from the whole frame and half from the anchor's domain
    and context (the same preamble).  No prompt is paired with itself and no
    unordered pair (by text) occurs twice.  Needs the
    ``domain``/``entity``/``attribute`` columns of :func:`generate_prompts`
    (``template`` and ``context`` optional).
    """
    rng = np.random.default_rng(seed)
    df = prompts.reset_index(drop=True)
    n = len(df)
    if n < 2 or n_pairs <= 0:
        return pd.DataFrame(columns=_PAIR_COLUMNS)
    groups = df["group"].to_numpy()
    templates = df["template"].to_numpy() if "template" in df else np.zeros(n, dtype=int)
    # the preamble a prompt is wrapped in (older frames: one context per template slot)
    contexts = df["context"].to_numpy() if "context" in df else templates

    texts = df["prompt"].to_numpy()
    domain, entity, attribute = (df[c].to_numpy() for c in ("domain", "entity", "attribute"))

    by_group: dict = {}
    by_slot: dict = {}  # (domain, attribute, template, context) -> rows
    by_da: dict = {}  # (domain, attribute) -> rows
    by_entity: dict = {}  # (domain, entity) -> rows
    by_dslot: dict = {}  # (domain, context) -> rows
    for i, (d, e, a, t, c) in enumerate(zip(domain, entity, attribute, templates, contexts)):
        by_group.setdefault(groups[i], []).append(i)
        by_slot.setdefault((d, a, t, c), []).append(i)
        by_da.setdefault((d, a), []).append(i)
        by_entity.setdefault((d, e), []).append(i)
        by_dslot.setdefault((d, c), []).append(i)
    multi = [rows for rows in by_group.values() if len(rows) > 1]

    def positive():
        rows = multi[int(rng.integers(len(multi)))]
        i, j = rng.choice(len(rows), size=2, replace=False)
        return rows[int(i)], rows[int(j)]

    def entity_swap():
        i = int(rng.integers(n))
        same = [j for j in by_slot[(domain[i], attribute[i], templates[i], contexts[i])]
                if entity[j] != entity[i]]
        if not same:  # sampled phrasings: fall back to any template of the attribute
            same = [j for j in by_da[(domain[i], attribute[i])] if entity[j] != entity[i]]
        if not same:
            return None
        # Prefer a related entity: the tables list neighbours together
        # (countries by continent, elements by number, books by author, ...).
        here = _ENTITY_RANK.get((domain[i], entity[i]), 0)
        dist = np.array([abs(_ENTITY_RANK.get((domain[j], entity[j]), 0) - here) for j in same])
        near = [same[k] for k in np.argsort(dist, kind="stable")[:_NEAR_ENTITIES]]
        return i, _pick(rng, near)

    def attribute_swap():
        i = int(rng.integers(n))
        others = [j for j in by_entity[(domain[i], entity[i])] if attribute[j] != attribute[i]]
        same_slot = [j for j in others if templates[j] == templates[i] and contexts[j] == contexts[i]]
        cands = same_slot or others
        return (i, _pick(rng, cands)) if cands else None

    def random_negative():
        # Half uniform over the frame, half within the anchor's domain and
        # phrasing slot (so sharing its preamble, like real boilerplate).
        i = int(rng.integers(n))
        if rng.random() < 0.5:
            j = _pick(rng, by_dslot[(domain[i], contexts[i])])
        else:
            j = int(rng.integers(n))
        return (i, j) if groups[i] != groups[j] else None

    n_pos = n_pairs // 2 if multi else 0
    n_neg = n_pairs - n_pos
    n_hard = int(round(hard_fraction * n_neg))
    n_ent = (n_hard + 1) // 2
    plan = [(positive, n_pos), (entity_swap, n_ent), (attribute_swap, n_hard - n_ent)]
    plan.append((random_negative, n_pairs - sum(k for _, k in plan)))

    seen: set[tuple[str, str]] = set()
    out: list[tuple[int, int]] = []
    shortfall = 0
    for make, quota in plan:
        quota += shortfall  # a kind that cannot be filled hands over to the next
        got, misses = 0, 0
        while got < quota and misses < _MAX_MISSES:  # misses: pool exhausted
            pair = make()
            key = None if pair is None else tuple(sorted((texts[pair[0]], texts[pair[1]])))
            if key is None or key[0] == key[1] or key in seen:
                misses += 1
                continue
            misses = 0
            seen.add(key)
            out.append(pair if rng.random() < 0.5 else (pair[1], pair[0]))
            got += 1
        shortfall = quota - got

    order = rng.permutation(len(out))
    a = np.array([out[k][0] for k in order], dtype=int)
    b = np.array([out[k][1] for k in order], dtype=int)
    return pd.DataFrame(
        {
            "prompt_a": texts[a] if len(a) else [],
            "prompt_b": texts[b] if len(b) else [],
            "label": (groups[a] == groups[b]).astype(float) if len(a) else [],
            "group_a": groups[a] if len(a) else [],
            "group_b": groups[b] if len(b) else [],
            "answers_a": [list(df.at[int(i), "answers"]) for i in a],
            "answers_b": [list(df.at[int(i), "answers"]) for i in b],
        },
        columns=_PAIR_COLUMNS,
    )


def _response(domain: str, entity: str, attribute: str, answer: str) -> str:
    return _cap(DOMAINS[domain].responses[attribute].format(e=entity, v=answer))


def generate_stream(
    prompts: pd.DataFrame,
    n_arrivals: int,
    seed: int = 0,
    zipf_s: float = 1.1,
) -> pd.DataFrame:
    """Simulate ``n_arrivals`` cache lookups drawn from ``prompts``.

    Columns (one row per arrival, in arrival order): ``prompt``, ``group``,
    ``answers`` (list[str]) and ``response`` (an answer sentence such as "The
    capital of France is Paris.").  Group popularity is Zipf: the groups are
    shuffled with ``seed`` and the group of rank r (1-based) is drawn with
    probability proportional to r**-zipf_s; the phrasing inside a group is
    uniform over that group's rows.
    """
    rng = np.random.default_rng(seed)
    df = prompts.reset_index(drop=True)
    if n_arrivals <= 0 or df.empty:
        return pd.DataFrame(columns=_STREAM_COLUMNS)
    rows_by_group: dict = {}
    for i, g in enumerate(df["group"]):
        rows_by_group.setdefault(g, []).append(i)
    names = sorted(rows_by_group)
    ranked = [names[i] for i in rng.permutation(len(names))]
    weights = np.arange(1, len(ranked) + 1, dtype=float) ** -float(zipf_s)
    drawn = rng.choice(len(ranked), size=int(n_arrivals), p=weights / weights.sum())
    picks = [_pick(rng, rows_by_group[ranked[k]]) for k in drawn]

    responses = {}
    for g in ranked:
        row = df.iloc[rows_by_group[g][0]]
        responses[g] = _response(row["domain"], row["entity"], row["attribute"], row["answers"][0])
    sel = df.iloc[picks]
    return pd.DataFrame(
        {
            "prompt": sel["prompt"].to_numpy(),
            "group": sel["group"].to_numpy(),
            "answers": [list(x) for x in sel["answers"]],
            "response": [responses[g] for g in sel["group"]],
        },
        columns=_STREAM_COLUMNS,
    )


def write_default_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n_train_pairs: int = 4000,
    n_test_pairs: int = 1500,
    n_arrivals: int = 5000,
    n_val_pairs: int = 600,
    n_val_arrivals: int = 2000,
    holdout_phrasings: bool = True,
) -> dict[str, Path]:
    """Write the default dataset as JSONL files under ``out_dir``.

    Files: ``prompts.jsonl`` (all prompts, with ``split``),
    ``pairs_train.jsonl`` / ``pairs_val.jsonl`` / ``pairs_test.jsonl`` (pairs
    drawn within each split), ``stream.jsonl`` (arrivals over the TEST prompts
    only, so an encoder fine-tuned on the train split is evaluated on unseen
    groups and, with ``holdout_phrasings``, unseen phrasings) and
    ``stream_val.jsonl`` (a separate stream over the VAL prompts: choose a
    threshold there, report it on ``stream.jsonl``).  Returns a mapping from
    the file stems ("prompts", "pairs_train", ...) to the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = generate_prompts(seed=seed, holdout_phrasings=holdout_phrasings)
    train, val, test = (prompts[prompts["split"] == split] for split in SPLITS)
    frames = {
        "prompts": prompts,
        "pairs_train": generate_pairs(train, n_train_pairs, seed=seed),
        "pairs_val": generate_pairs(val, n_val_pairs, seed=seed + 2),
        "pairs_test": generate_pairs(test, n_test_pairs, seed=seed + 1),
        "stream": generate_stream(test, n_arrivals, seed=seed),
        "stream_val": generate_stream(val, n_val_arrivals, seed=seed + 1),
    }
    paths = {}
    for name, frame in frames.items():
        path = out / f"{name}.jsonl"
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
        paths[name] = path
    return paths


def run(cfg) -> dict:
    """``raycache generate``: write the default dataset to ``cfg.out`` (a GenerateConfig)."""
    paths = write_default_dataset(cfg.out, seed=cfg.seed, n_train_pairs=cfg.n_train_pairs,
                                  n_test_pairs=cfg.n_test_pairs, n_arrivals=cfg.n_arrivals,
                                  n_val_pairs=cfg.n_val_pairs, n_val_arrivals=cfg.n_val_arrivals,
                                  holdout_phrasings=cfg.holdout_phrasings)
    return {name: str(path) for name, path in paths.items()}
