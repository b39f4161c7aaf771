"""Engine unit tests (no Ray): hits, misses, exact tier, scopes, LRU, TTL, persistence."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raycache.cache import (LRUEviction, PeriodicSnapshot, Scope, SemanticCache, SnapshotError,
                            StaticThreshold, history_hash, make_scope, quarantine)
from raycache.cache import persist
from raycache.config import CacheConfig

DIM = 64


class HashingEncoder:
    """Deterministic bag-of-words encoder: each lower-cased word adds a fixed random unit vector.

    Prompts sharing most words get high cosine. ``calls`` counts encoded texts.
    """

    dim = DIM
    source = "hashing-test-encoder"

    def __init__(self) -> None:
        self.calls = 0

    @staticmethod
    def _word(word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(DIM)
        return v / np.linalg.norm(v)

    def encode(self, texts, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), DIM), np.float32)
        for i, text in enumerate(texts):
            self.calls += 1
            words = re.findall(r"\w+", text.lower()) or ["<empty>"]
            v = sum(self._word(w) for w in words)
            out[i] = v / np.linalg.norm(v)
        return out


class TextHashEncoder:
    """Each distinct string gets a fixed random unit vector: different texts are near-orthogonal
    (|cosine| < 0.6 in 64 dimensions), so only the exact tier ever matches at threshold 0.99."""

    dim = DIM
    source = "text-hash-test-encoder"

    def encode(self, texts, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), DIM), np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(DIM)
            out[i] = v / np.linalg.norm(v)
        return out


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def unit(*coords: float) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[:len(coords)] = coords
    return v / np.linalg.norm(v)


def at_cosine(c: float) -> np.ndarray:
    """A unit vector whose cosine with unit(1) is c."""
    return unit(c, float(np.sqrt(1 - c * c)))


@pytest.fixture()
def cache() -> SemanticCache:
    return SemanticCache(HashingEncoder(), DIM, policy=StaticThreshold(0.9))


# ----------------------------------------------------------------------------- hits and misses
def test_empty_cache_misses_without_encoding(cache):
    result = cache.check("What is the capital of France?")
    assert not result.hit and result.similarity is None and result.response is None
    assert cache.encoder.calls == 0


def test_exact_repeat_hits_without_encoding(cache):
    entry_id = cache.store("What is the capital of France?", "Paris")
    calls = cache.encoder.calls
    result = cache.check("  What is the capital of \t  France?\n")  # whitespace only differs
    assert result.hit and result.exact and result.response == "Paris"
    assert result.entry_id == entry_id and result.similarity == 1.0
    assert result.matched_prompt == "What is the capital of France?"
    assert cache.encoder.calls == calls
    case = cache.check("  what is the CAPITAL of   France?")  # case differs: not exact by default
    assert not case.exact and cache.encoder.calls == calls + 1


def test_exact_tier_case_folding_is_opt_in():
    folded = SemanticCache(HashingEncoder(), DIM, exact_casefold=True)
    folded.store("What is the capital of France?", "Paris")
    calls = folded.encoder.calls
    assert folded.check("what is the CAPITAL of ｆrance?").exact and folded.encoder.calls == calls
    assert folded.stats()["exact_match"] == "case-folded"


def test_exact_tier_off_encodes_repeats():
    cache = SemanticCache(HashingEncoder(), DIM, exact_tier=False)
    cache.store("hello there", "hi")
    calls = cache.encoder.calls
    result = cache.check("hello there")
    assert result.hit and not result.exact and cache.encoder.calls == calls + 1


def test_static_threshold_decides_on_similarity(cache):
    entry_id = cache.store("stored", "answer", vector=unit(1))
    near = cache.check("near", vector=at_cosine(0.95))
    far = cache.check("far", vector=at_cosine(0.85))
    assert near.hit and near.entry_id == entry_id and near.similarity == pytest.approx(0.95, abs=1e-5)
    assert not far.hit and far.response is None and far.entry_id is None
    assert far.similarity == pytest.approx(0.85, abs=1e-5)  # the best similarity is still reported
    assert StaticThreshold(0.9).is_hit(0.9) and not StaticThreshold(0.9).is_hit(0.8999)


def test_paraphrase_with_the_hashing_encoder(cache):
    cache.store("how do I reset my router password", "Hold the reset button.")
    assert cache.check("how do I reset my router password please").hit
    assert not cache.check("best pizza dough recipe").hit


def test_check_batch_encodes_only_what_the_exact_tier_cannot_answer(cache):
    stored = "alpha beta gamma delta epsilon zeta"
    cache.store(stored, "A")
    cache.store("delta epsilon", "D", namespace="other")
    calls = cache.encoder.calls
    results = cache.check_batch([stored, stored + " eta", "delta epsilon", "delta epsilon"],
                                namespaces=["default", "default", "other", "default"])
    assert [r.hit for r in results] == [True, True, True, False]
    assert [r.exact for r in results] == [True, False, True, False]
    assert cache.encoder.calls == calls + 2  # two non-exact prompts in non-empty scopes
    stats = cache.stats()
    assert (stats["lookups"], stats["hits"], stats["exact_hits"], stats["misses"]) == (4, 3, 2, 1)


def test_storing_the_same_prompt_replaces_the_entry(cache):
    first = cache.store("Same prompt", "old")
    second = cache.store("Same   prompt ", "new")
    assert second > first and len(cache) == 1
    assert cache.check("same prompt").response == "new"
    assert cache.stats()["replaced"] == 1


def test_entry_ids_increase_and_are_never_reused(cache):
    ids = [cache.store(f"prompt {i}", "r") for i in range(3)]
    cache.clear()
    assert cache.store("prompt 0", "r") > max(ids)


def test_bad_input_is_rejected_with_a_clear_error(cache):
    with pytest.raises(ValueError, match="empty"):
        cache.check("   ")
    with pytest.raises(ValueError, match="namespace"):
        cache.check("x", namespace="")
    with pytest.raises(ValueError, match=r"shape \(1, 64\)"):
        cache.check("x", vector=np.ones(3))
    with pytest.raises(ValueError, match="ttl_s"):
        cache.store("x", "y", ttl_s=0)
    with pytest.raises(TypeError, match="string"):
        cache.store(123, "y")
    with pytest.raises(ValueError, match="JSON"):
        cache.check("x", history=[object()])
    no_encoder = SemanticCache(None, DIM)
    no_encoder.store("a", "b", vector=unit(1))
    with pytest.raises(ValueError, match="pass vectors"):
        no_encoder.check("c")


# ----------------------------------------------------------------------------- scopes
def test_namespaces_and_histories_are_isolated(cache):
    cache.store("What are its types?", "Python types: int, str...", namespace="t",
                history=["Tell me about Python"])
    assert cache.check("What are its types?", namespace="t", history=["Tell me about Python"]).hit
    assert not cache.check("What are its types?", namespace="t", history=["Tell me about snakes"]).hit
    assert not cache.check("What are its types?", namespace="t").hit
    assert not cache.check("What are its types?", namespace="u", history=["Tell me about Python"]).hit


def test_history_hash_is_canonical():
    a = [{"role": "user", "content": "hi"}]
    b = [{"content": "hi", "role": "user"}]
    assert history_hash(a) == history_hash(b) != history_hash([{"role": "assistant", "content": "hi"}])
    assert history_hash(None) == history_hash([]) == ""
    assert make_scope("ns", a) == Scope("ns", history_hash(a))


PROMPTS = ["the cat sat", "the cat sat down", "a dog ran", "dogs run fast", "the cat"]
NAMESPACES = ["a", "b", "c"]
# (history, equivalence class): classes that differ must never share entries
HISTORIES = [(None, 0), ([], 0), (["hi"], 1), ([{"role": "user", "content": "hi"}], 2),
             ([{"content": "hi", "role": "user"}], 2), (["hi", "there"], 3)]


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from(PROMPTS), st.sampled_from(NAMESPACES),
                              st.sampled_from(HISTORIES)), max_size=30),
       index=st.sampled_from(["flat", "hnsw"]))
def test_no_lookup_ever_returns_an_entry_of_another_scope(ops, index):
    cache = SemanticCache(HashingEncoder(), DIM, index=index, policy=StaticThreshold(-1.0))
    scope_of: dict[int, tuple] = {}  # entry id -> (namespace, history class)
    live: dict[tuple, dict[str, int]] = {}  # scope -> normalised prompt -> id (same-text replaces)
    for n, (is_store, prompt, namespace, (history, hclass)) in enumerate(ops):
        scope = (namespace, hclass)
        if is_store:
            entry_id = cache.store(prompt, f"response {n}", namespace, history)
            scope_of[entry_id] = scope
            live.setdefault(scope, {})[prompt] = entry_id
            continue
        result = cache.check(prompt, namespace, history)
        # threshold -1: any live entry of the scope is close enough, so hit <=> scope non-empty
        assert result.hit == bool(live.get(scope))
        if result.hit:
            assert scope_of[result.entry_id] == scope
            assert result.entry_id in live[scope].values()


# ----------------------------------------------------------------------------- capacity and TTL
def test_lru_eviction_at_capacity_and_a_hit_refreshes_recency():
    cache = SemanticCache(HashingEncoder(), DIM, eviction=LRUEviction(capacity=3))
    ids = {p: cache.store(p, p.upper()) for p in ("alpha", "bravo", "charlie")}
    assert cache.check("alpha").hit  # alpha is now the most recently used
    cache.store("delta", "DELTA")
    assert len(cache) == 3 and cache.stats()["evictions"] == 1
    assert not cache.check("bravo").hit
    assert {r.entry_id for r in cache.check_batch(["alpha", "charlie"])} == {ids["alpha"], ids["charlie"]}
    assert cache.check("delta").hit


def test_ttl_expiry_with_an_injected_clock():
    clock = FakeClock()
    cache = SemanticCache(HashingEncoder(), DIM, eviction=LRUEviction(default_ttl_s=10), clock=clock)
    cache.store("short lived", "a")
    cache.store("long lived", "b", ttl_s=100)
    clock.now += 9.9
    assert cache.check("short lived").hit
    clock.now += 0.1  # exactly at the deadline: expired
    assert not cache.check("short lived").hit
    assert not cache.check("short lived entry").hit  # not by similarity either
    assert cache.check("long lived").hit
    stats = cache.stats()
    assert stats["expirations"] == 1 and stats["entries"] == 1 and len(cache) == 1
    clock.now += 100
    assert len(cache) == 0 and cache.stats()["expirations"] == 2


def test_clear_one_namespace(cache):
    cache.store("x one", "1", namespace="a")
    cache.store("x two", "2", namespace="a", history=["h"])
    cache.store("x one", "3", namespace="b")
    assert cache.clear("a") == 2
    assert not cache.check("x one", namespace="a").hit and cache.check("x one", namespace="b").hit
    assert cache.clear() == 1 and len(cache) == 0


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_index_options_find_the_nearest_entry(index):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((200, DIM)).astype(np.float32)
    cache = SemanticCache(None, DIM, index=index, eviction=LRUEviction(capacity=150),
                          policy=StaticThreshold(0.95))
    ids = [cache.store(f"p{i}", f"r{i}", vector=v) for i, v in enumerate(vectors)]
    noisy = vectors + 0.05 * rng.standard_normal(vectors.shape).astype(np.float32)
    results = cache.check_batch([f"q{i}" for i in range(200)], vectors=noisy)
    assert not any(r.hit for r in results[:50])  # evicted
    assert [r.entry_id for r in results[50:]] == ids[50:]


# ----------------------------------------------------------------------------- persistence
def test_snapshot_round_trip(tmp_path):
    clock = FakeClock()
    cache = SemanticCache(HashingEncoder(), DIM, eviction=LRUEviction(capacity=3), clock=clock,
                          model_tag="m")
    a = cache.store("alpha prompt", "A", namespace="n1", history=["earlier"])
    b = cache.store("bravo prompt", "B", ttl_s=50)
    c = cache.store("charlie prompt", "C")
    cache.check("alpha prompt", namespace="n1", history=["earlier"])  # LRU order: b, c, a
    path = cache.save(tmp_path / "cache.npz")

    loaded = SemanticCache.load(path, encoder=HashingEncoder(), eviction=LRUEviction(capacity=3),
                                clock=clock, model_tag="m")
    assert len(loaded) == 3
    hit = loaded.check("alpha prompt", namespace="n1", history=["earlier"])
    assert hit.hit and hit.entry_id == a and hit.response == "A"
    assert not loaded.check("alpha prompt").hit  # scope survived
    bravo_vector = HashingEncoder().encode(["bravo prompt"])[0]
    semantic = loaded.check("another text", vector=bravo_vector)  # vectors survived
    assert semantic.entry_id == b and not semantic.exact and semantic.similarity == pytest.approx(1)
    clock.now += 50
    assert not loaded.check("bravo prompt").hit  # TTL survived
    d = loaded.store("delta prompt", "D")
    e = loaded.store("echo prompt", "E")  # capacity 3 after b expired: evicts c (LRU), not a
    assert min(d, e) > c
    assert loaded.check("alpha prompt", namespace="n1", history=["earlier"]).hit
    assert not loaded.check("charlie prompt").hit


def test_failed_write_keeps_the_old_snapshot(tmp_path, monkeypatch):
    cache = SemanticCache(HashingEncoder(), DIM)
    cache.store("first", "1")
    path = cache.save(tmp_path / "cache.npz")
    cache.store("second", "2")

    def torn_write(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(persist.np, "savez", torn_write)
    with pytest.raises(OSError, match="disk full"):
        cache.save(path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]  # no temp file left behind
    restored = SemanticCache.load(path, encoder=HashingEncoder())
    assert len(restored) == 1 and restored.check("first").hit and not restored.check("second").hit


@pytest.mark.parametrize("content", [b"not a snapshot at all", b""])
def test_corrupt_snapshot_raises_and_is_kept_aside(tmp_path, content):
    path = tmp_path / "cache.npz"
    path.write_bytes(content)
    cache = SemanticCache(HashingEncoder(), DIM)
    with pytest.raises(SnapshotError, match=re.escape(str(path))):
        cache.restore(path)
    aside = quarantine(path)
    assert not path.exists() and aside.read_bytes() == content and "corrupt" in aside.name


def test_truncated_snapshot_is_an_error(tmp_path):
    cache = SemanticCache(HashingEncoder(), DIM)
    cache.store("some prompt", "r")
    path = cache.save(tmp_path / "cache.npz")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(SnapshotError):
        SemanticCache.load(path)


def test_snapshot_of_another_encoder_is_refused(tmp_path):
    cache = SemanticCache(HashingEncoder(), DIM, model_tag="model-a")
    cache.store("p", "r")
    path = cache.save(tmp_path / "c.npz")
    with pytest.raises(SnapshotError, match="dim 64"):
        SemanticCache(None, 32).restore(path)
    with pytest.raises(SnapshotError, match="model-a"):
        SemanticCache(None, DIM, model_tag="model-b").restore(path)


def test_periodic_snapshot_saves_only_changes_and_on_stop(tmp_path):
    cache = SemanticCache(HashingEncoder(), DIM)
    path = tmp_path / "periodic.npz"
    saver = PeriodicSnapshot(path, cache.snapshot, lambda: cache.version, interval_s=3600)
    assert not saver.save(only_if_changed=True) and not path.exists()
    cache.store("one", "1")
    assert saver.save(only_if_changed=True) and len(SemanticCache.load(path)) == 1
    assert not saver.save(only_if_changed=True)
    saver.start()
    cache.store("two", "2")
    saver.stop(final_save=True)
    assert len(SemanticCache.load(path)) == 2 and saver.saves == 2


# ----------------------------------------------------------------------------- config
def test_from_config_builds_the_configured_parts():
    cfg = CacheConfig(index="hnsw", capacity=2, ttl_s=5, threshold=0.75, exact_tier=False)
    cache = SemanticCache.from_config(cfg, encoder=HashingEncoder())
    stats = cache.stats()
    assert (stats["index"], stats["capacity"], stats["default_ttl_s"], stats["exact_tier"]) == ("hnsw", 2, 5, False)
    assert stats["policy"] == {"policy": "static", "threshold": 0.75}
    assert cache.model_tag == "hashing-test-encoder" and cache.dim == DIM


# ----------------------------------------------------------------------------- the real encoder
def test_paraphrase_hits_with_the_default_encoder(encoder):
    cache = SemanticCache.from_config(CacheConfig(threshold=0.85), encoder=encoder)
    entry_id = cache.store("What is the capital of France?", "Paris.")
    hit = cache.check("Which city is the capital of France?")
    assert hit.hit and hit.entry_id == entry_id and 0.85 <= hit.similarity < 1
    assert not cache.check("What is the capital of Germany?").hit
    assert not cache.check("How do I bake sourdough bread?").hit
