"""Tests for the embedded default workload (no model loading: fast)."""

from __future__ import annotations

import string

import pandas as pd
import pytest

from raycache import workload as wl


@pytest.fixture(scope="module")
def prompts() -> pd.DataFrame:
    return wl.generate_prompts(seed=0)


@pytest.fixture(scope="module")
def train(prompts) -> pd.DataFrame:
    return prompts[prompts["split"] == "train"]


@pytest.fixture(scope="module")
def test_split(prompts) -> pd.DataFrame:
    return prompts[prompts["split"] == "test"]


@pytest.fixture(scope="module")
def pairs(train) -> pd.DataFrame:
    return wl.generate_pairs(train, 3000, seed=0)


@pytest.fixture(scope="module")
def stream(test_split) -> pd.DataFrame:
    return wl.generate_stream(test_split, 4000, seed=0)


# -- fact table -------------------------------------------------------------


def test_fact_table_size():
    assert set(wl.FACTS) == set(wl.DOMAINS)
    assert len(wl.DOMAINS) >= 6
    assert sum(len(entities) for entities in wl.FACTS.values()) >= 300
    for domain, entities in wl.FACTS.items():
        assert len(entities) >= 20, domain


def test_every_entity_has_every_attribute():
    for domain, spec in wl.DOMAINS.items():
        assert len(spec.attributes) >= 2
        for entity, attrs in wl.FACTS[domain].items():
            assert set(attrs) == set(spec.attributes), (domain, entity)
            for answers in attrs.values():
                assert answers and all(isinstance(a, str) and a.strip() for a in answers)


def test_entity_names_unique_across_domains():
    names = [e for entities in wl.FACTS.values() for e in entities]
    assert len(names) == len(set(names))


def test_templates_per_attribute():
    for domain, spec in wl.DOMAINS.items():
        assert set(spec.templates) == set(spec.attributes) == set(spec.responses)
        for attribute, templates in spec.templates.items():
            assert len(templates) >= 5, (domain, attribute)
            assert len(set(templates)) == len(templates)
            fields = [{f for _, f, _, _ in string.Formatter().parse(t) if f} for t in templates]
            assert all(f == {"e"} for f in fields), (domain, attribute)
        for response in spec.responses.values():
            assert "{e}" in response and "{v}" in response


def test_sample_facts():
    assert wl.FACTS["country"]["France"]["capital"][0] == "Paris"
    assert wl.FACTS["element"]["iron"]["symbol"] == ("Fe",)
    assert wl.FACTS["element"]["iron"]["atomic_number"] == ("26",)
    assert wl.FACTS["element"]["iron"]["period"] == ("4",)
    assert wl.FACTS["book"]["Dune"]["author"][0] == "Frank Herbert"
    # "the X" answers also accept the bare "X"
    assert "Eiffel Tower" in wl.FACTS["city"]["Paris"]["landmark"]


# -- prompts ----------------------------------------------------------------


def test_prompt_columns_and_groups(prompts):
    for col in ["prompt", "answers", "group", "domain", "entity", "attribute", "template", "context", "split"]:
        assert col in prompts.columns
    assert prompts["prompt"].is_unique
    assert set(prompts["split"]) == {"train", "val", "test"}
    expected = prompts["domain"] + ":" + prompts["entity"] + ":" + prompts["attribute"]
    assert (prompts["group"] == expected).all()
    row = prompts[prompts["group"] == "country:France:capital"]
    assert len(row) == len(wl.phrasings_of(row["split"].iloc[0]))
    assert all(a == ["Paris"] for a in row["answers"])
    assert all(isinstance(a, list) and a for a in prompts["answers"])


def test_prompts_mention_entity(prompts):
    ok = [e.lower() in p.lower() for p, e in zip(prompts["prompt"], prompts["entity"])]
    assert all(ok)


def test_prompts_deterministic(prompts):
    pd.testing.assert_frame_equal(prompts, wl.generate_prompts(seed=0))
    other = wl.generate_prompts(seed=1)
    assert not other["split"].equals(prompts["split"])


def test_split_by_entity(prompts, train, test_split):
    val = prompts[prompts["split"] == "val"]
    for a, b in ((train, test_split), (train, val), (val, test_split)):
        assert not set(a["group"]) & set(b["group"])
        assert not set(a["entity"]) & set(b["entity"])
    frac = test_split["entity"].nunique() / prompts["entity"].nunique()
    assert 0.15 <= frac <= 0.25
    assert 0.05 <= val["entity"].nunique() / prompts["entity"].nunique() <= 0.15
    assert set(test_split["domain"]) == set(wl.DOMAINS) == set(val["domain"])  # stratified per domain


def test_val_and_test_phrasings_are_held_out_from_training(prompts, train, test_split):
    """Val/test prompts use templates and preambles that no train prompt uses."""
    def used(frame):
        return set(zip(frame["domain"], frame["attribute"], frame["template"])), set(frame["context"]) - {0}

    train_templates, train_contexts = used(train)
    for split in ("val", "test"):
        templates, contexts = used(prompts[prompts["split"] == split])
        assert not templates & train_templates and not contexts & train_contexts, split
    assert (test_split.groupby("group").size() >= 3).all()  # enough phrasings for positives
    old = wl.generate_prompts(seed=0, holdout_phrasings=False)
    assert set(old["template"]) == set(range(6)) and (old.groupby("group").size() == 6).all()


def test_phrasings_per_group():
    p = wl.generate_prompts(seed=0, phrasings_per_group=2)
    assert (p.groupby("group").size() == 2).all()
    pd.testing.assert_frame_equal(p, wl.generate_prompts(seed=0, phrasings_per_group=2))


def test_noise_toggle():
    clean = wl.generate_prompts(seed=0, noise=False)
    assert clean["prompt"].str[0].str.isupper().all()
    noisy = wl.generate_prompts(seed=0, typo_rate=0.5)
    assert (noisy["prompt"] != wl.generate_prompts(seed=0)["prompt"]).any()
    assert noisy["group"].equals(clean["group"])
    # noise and phrasing sampling never move the train/test split
    assert noisy["split"].equals(clean["split"])
    sampled = wl.generate_prompts(seed=0, phrasings_per_group=2)
    split_of = dict(zip(clean["entity"], clean["split"]))
    assert sampled["entity"].map(split_of).equals(sampled["split"])


# -- pairs ------------------------------------------------------------------


def test_pair_columns_and_size(pairs):
    assert list(pairs.columns) == ["prompt_a", "prompt_b", "label", "group_a", "group_b", "answers_a", "answers_b"]
    assert len(pairs) == 3000
    assert 0.45 <= pairs["label"].mean() <= 0.55


def test_pair_labels_match_groups(pairs):
    assert ((pairs["label"] == 1.0) == (pairs["group_a"] == pairs["group_b"])).all()
    assert set(pairs["label"]) == {0.0, 1.0}
    pos = pairs[pairs["label"] == 1.0]
    assert (pos["answers_a"] == pos["answers_b"]).all()


def test_pair_rows_consistent_with_frame(pairs, train):
    lookup = dict(zip(train["prompt"], train["group"]))
    assert pairs["prompt_a"].map(lookup).equals(pairs["group_a"])
    assert pairs["prompt_b"].map(lookup).equals(pairs["group_b"])


def test_no_self_or_duplicate_pairs(pairs):
    assert (pairs["prompt_a"] != pairs["prompt_b"]).all()
    keys = {tuple(sorted(ab)) for ab in zip(pairs["prompt_a"], pairs["prompt_b"])}
    assert len(keys) == len(pairs)


def test_hard_negative_mix(pairs):
    neg = pairs[pairs["label"] == 0.0]
    a = neg["group_a"].str.split(":", expand=True)
    b = neg["group_b"].str.split(":", expand=True)
    entity_swap = (a[0] == b[0]) & (a[2] == b[2]) & (a[1] != b[1])
    attribute_swap = (a[0] == b[0]) & (a[1] == b[1])
    # hard_fraction=0.7 split evenly; random negatives can add a few of each
    assert 0.3 <= entity_swap.mean() <= 0.45
    assert 0.3 <= attribute_swap.mean() <= 0.45


def test_pairs_deterministic_and_split_local(pairs, train, test_split):
    pd.testing.assert_frame_equal(pairs, wl.generate_pairs(train, 3000, seed=0))
    test_pairs = wl.generate_pairs(test_split, 800, seed=1)
    allowed = set(test_split["prompt"])
    assert set(test_pairs["prompt_a"]) | set(test_pairs["prompt_b"]) <= allowed


def test_pairs_small_frame():
    p = wl.generate_prompts(seed=0)
    tiny = p[p["entity"].isin(["France", "Spain"])]
    out = wl.generate_pairs(tiny, 10_000, seed=0)
    assert 0 < len(out) < 10_000
    keys = {tuple(sorted(ab)) for ab in zip(out["prompt_a"], out["prompt_b"])}
    assert len(keys) == len(out)
    assert len(wl.generate_pairs(tiny.iloc[:1], 10, seed=0)) == 0


# -- stream -----------------------------------------------------------------


def test_stream_columns_and_membership(stream, test_split):
    assert list(stream.columns) == ["prompt", "group", "answers", "response"]
    assert len(stream) == 4000
    lookup = dict(zip(test_split["prompt"], test_split["group"]))
    assert stream["prompt"].isin(lookup.keys()).all()
    assert stream["prompt"].map(lookup).equals(stream["group"])


def test_stream_zipf_skew(stream):
    counts = stream["group"].value_counts()
    assert counts.iloc[0] >= 10 * counts.median()
    assert counts.iloc[0] / len(stream) > 0.05


def test_stream_responses(stream):
    for answers, response in zip(stream["answers"], stream["response"]):
        assert answers[0] in response
    one = stream.groupby("group")["response"].nunique()
    assert (one == 1).all()
    france = wl.generate_stream(
        wl.generate_prompts(seed=0).query("group == 'country:France:capital'"), 3, seed=0
    )
    assert set(france["response"]) == {"The capital of France is Paris."}


def test_stream_deterministic(stream, test_split):
    pd.testing.assert_frame_equal(stream, wl.generate_stream(test_split, 4000, seed=0))
    assert not stream["prompt"].equals(wl.generate_stream(test_split, 4000, seed=1)["prompt"])


# -- files ------------------------------------------------------------------


def test_write_default_dataset(tmp_path):
    paths = wl.write_default_dataset(tmp_path / "data", seed=0, n_train_pairs=200, n_test_pairs=100, n_arrivals=300)
    assert set(paths) == {"prompts", "pairs_train", "pairs_val", "pairs_test", "stream", "stream_val"}
    assert all(p.exists() and p.suffix == ".jsonl" for p in paths.values())
    prompts = pd.read_json(paths["prompts"], orient="records", lines=True)
    stream = pd.read_json(paths["stream"], orient="records", lines=True)
    train_pairs = pd.read_json(paths["pairs_train"], orient="records", lines=True)
    test_pairs = pd.read_json(paths["pairs_test"], orient="records", lines=True)
    assert len(prompts) == len(wl.generate_prompts(seed=0))
    assert (len(train_pairs), len(test_pairs), len(stream)) == (200, 100, 300)
    test_prompts = set(prompts.loc[prompts["split"] == "test", "prompt"])
    assert set(stream["prompt"]) <= test_prompts
    assert set(test_pairs["prompt_a"]) | set(test_pairs["prompt_b"]) <= test_prompts
    assert not (set(train_pairs["prompt_a"]) | set(train_pairs["prompt_b"])) & test_prompts
    assert isinstance(stream["answers"].iloc[0], list)
    val_prompts = set(prompts.loc[prompts["split"] == "val", "prompt"])
    stream_val = pd.read_json(paths["stream_val"], orient="records", lines=True)
    pairs_val = pd.read_json(paths["pairs_val"], orient="records", lines=True)
    assert set(stream_val["prompt"]) <= val_prompts
    assert set(pairs_val["prompt_a"]) | set(pairs_val["prompt_b"]) <= val_prompts


def test_generate_cli_writes_readable_files(tmp_path):
    from raycache.cli import run_job
    from raycache.data import read_pairs, read_prompts, read_stream

    assert run_job("generate", ["--out", str(tmp_path), "--n-train-pairs", "50", "--n-test-pairs", "40",
                                "--n-arrivals", "30"]) == 0
    assert len(read_pairs(tmp_path / "pairs_train.jsonl")) == 50
    assert len(read_pairs(tmp_path / "pairs_test.jsonl")) == 40
    stream = read_stream(tmp_path / "stream.jsonl")
    prompts = read_prompts(tmp_path / "prompts.jsonl")
    assert len(stream) == 30
    assert set(stream["group"]) <= set(prompts.loc[prompts["split"] == "test", "group"])


@pytest.mark.slow
def test_base_encoder_is_weak_on_the_held_out_test_pairs():
    """all-MiniLM-L6-v2 separates the test split's hard pairs poorly (ROC-AUC < 0.75)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from raycache.encoder import Encoder

    p = wl.generate_prompts(seed=0)
    pairs = wl.generate_pairs(p[p["split"] == "test"], 600, seed=1)
    texts = sorted(set(pairs["prompt_a"]) | set(pairs["prompt_b"]))
    vec = dict(zip(texts, Encoder.load(device="cpu").encode(texts)))
    sims = [float(np.dot(vec[a], vec[b])) for a, b in zip(pairs["prompt_a"], pairs["prompt_b"])]
    assert roc_auc_score(pairs["label"], sims) < 0.75
