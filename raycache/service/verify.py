"""Online verification in the service: verified hits move the threshold and feed the next fine-tune.

:class:`VerifyingBackend` wraps the service's cache backend (the routes do not change). The engine
below it runs a static threshold at the online policy's *candidate floor*, so every lookup comes back
with its nearest cached prompt; the wrapper then decides per namespace with
:class:`raycache.cache.online_policy.OnlinePolicy`:

* a hit to serve: returned as is (no added latency: a dictionary update);
* a hit picked for verification (more often near the threshold): returned as a *miss*, so the
  proxy calls the upstream and the caller gets the upstream's answer, the verified one; when the
  route stores that answer, the judge compares it in the background with the cached response;
* a near miss picked for shadow verification: a miss anyway; its upstream answer is judged against
  the nearest entry's response in the background (no extra upstream call);
* everything else: a miss.

The judge is any teacher backend of :mod:`raycache.labeling.backends` (``reference``: the fresh
and the cached responses must match after normalisation; ``hf`` / ``openai`` / ``vllm``: an LLM
judges whether one response can answer both prompts). Each verdict updates the namespace's counts
and bound (``/v1/cache/stats`` field ``online``; Prometheus gauges and counters when running on
Ray) and is appended, as ``(prompt_a = new prompt, prompt_b = matched prompt, label = P(yes))``, to
a Parquet labelled-pairs folder (``verified_pairs_out``, any pyarrow filesystem) that
``raycache train --pairs`` reads unchanged.

State lives in the ingress replica that serves the request (one by default).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Optional

import pandas as pd

from raycache.cache.online_policy import OnlinePolicy, OnlineSettings

logger = logging.getLogger(__name__)

MAX_PENDING = 10_000  # verifications waiting for their upstream answer (oldest dropped)


def _key(namespace: str, prompt: str, history: Any) -> tuple:
    return (namespace, prompt, repr(history))


class Judge:
    """``judge(prompt, matched_prompt, cached_response, fresh_response) -> P(yes) or None`` with a
    teacher backend (``kind``: reference, hf, openai, vllm)."""

    def __init__(self, kind: str = "reference", model: Optional[str] = None,
                 endpoint: Optional[str] = None, api_key_env: str = "OPENAI_API_KEY",
                 teacher: Any = None):
        if teacher is None:
            from raycache.config import LabelConfig
            from raycache.labeling.backends import teacher_class

            cfg = LabelConfig(pairs="-", out="-", teacher=kind, teacher_model=model,
                              endpoint=endpoint, api_key_env=api_key_env)
            cls = teacher_class(kind)
            cls.check_config(cfg)
            teacher = cls(cfg)
        self.teacher = teacher
        self.name = kind

    def judge(self, prompt: str, matched_prompt: str, cached: str, fresh: str) -> Optional[float]:
        pairs = pd.DataFrame({"prompt_a": [prompt], "prompt_b": [matched_prompt],
                              "answers_a": [[fresh]], "answers_b": [[cached]]})
        (label, error), = self.teacher.judge(pairs)
        if error:
            logger.warning("judge could not decide a verification: %s", error)
        return label


class PairSink:
    """Appends verified pairs to a Parquet folder, one new shard per ``flush_rows`` rows (and on
    :meth:`flush`): ``prompt_a``, ``prompt_b``, ``label`` (judge's P(yes)), ``namespace``,
    ``similarity``, ``kind`` (hit | shadow), ``teacher``, ``verified_at``."""

    def __init__(self, folder: str, flush_rows: int = 100):
        self.folder = folder.rstrip("/")
        self.flush_rows = flush_rows
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self.written = 0
        self.shards: list[str] = []

    def append(self, row: dict) -> None:
        with self._lock:
            self._rows.append(row)
            full = len(self._rows) >= self.flush_rows
        if full:
            self.flush()

    def flush(self) -> Optional[str]:
        from raycache.data import write_table

        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return None
        path = f"{self.folder}/verified-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        try:
            write_table(pd.DataFrame(rows), path)
        except Exception as exc:  # never fail a request over the dataset; keep the rows
            logger.error("could not write verified pairs to %s (%s)", path, exc)
            with self._lock:
                self._rows = rows + self._rows
            return None
        self.written += len(rows)
        self.shards.append(path)
        return path


class _Metrics:
    """Prometheus (Ray metrics) of the online policy; a no-op outside Ray."""

    def __init__(self) -> None:
        self.ok = False
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            self.verified = metrics.Counter("raycache_verifications", "Verified requests, by verdict.",
                                            tag_keys=("namespace", "kind", "verdict"))
            self.threshold = metrics.Gauge("raycache_online_threshold", "Online threshold.",
                                           tag_keys=("namespace",))
            self.ucb = metrics.Gauge("raycache_online_false_hit_ucb",
                                     "Upper confidence bound on the per-request false-hit rate.",
                                     tag_keys=("namespace",))
            self.ok = True
        except Exception:  # pragma: no cover - metrics are best effort
            self.ok = False

    def record(self, namespace: str, kind: str, wrong: bool, threshold: float, ucb: float) -> None:
        if not self.ok:
            return
        self.verified.inc(1, tags={"namespace": namespace, "kind": kind,
                                   "verdict": "wrong" if wrong else "right"})
        self.threshold.set(threshold, tags={"namespace": namespace})
        self.ucb.set(ucb, tags={"namespace": namespace})


class VerifyingBackend:
    """A CacheBackend whose decisions come from an :class:`OnlinePolicy` (see the module docstring).

    ``inner``: the backend over an engine whose static threshold is ``policy.candidate_floor``;
    ``judge``: a :class:`Judge`; ``sink``: a :class:`PairSink` or None.
    """

    def __init__(self, inner: Any, policy: OnlinePolicy, judge: Judge, sink: Optional[PairSink] = None):
        self.inner = inner
        self.policy = policy
        self.judge = judge
        self.sink = sink
        self.metrics = _Metrics()
        self._pending: OrderedDict = OrderedDict()
        self._tasks: set = set()
        self._served = {"lookups": 0, "hits": 0, "verified_hits": 0, "shadow": 0}

    async def lookup(self, prompts: list[str], namespace: str = "default",
                     histories: Optional[list] = None) -> list[dict]:
        results = await self.inner.lookup(prompts, namespace, histories)
        out = []
        for i, (prompt, found) in enumerate(zip(prompts, results)):
            history = histories[i] if histories else None
            candidate = found.get("similarity") if found.get("hit") else None
            rid, decision = self.policy.decide(namespace, candidate, exact=bool(found.get("exact")))
            self._served["lookups"] += 1
            if decision.hit and decision.verify is None:
                self._served["hits"] += 1
                out.append(found)
                continue
            if decision.verify:
                self._served["verified_hits" if decision.verify == "hit" else "shadow"] += 1
                self._pending[_key(namespace, prompt, history)] = (
                    rid, decision.verify, found.get("matched_prompt"), found.get("response"),
                    decision.similarity)
                while len(self._pending) > MAX_PENDING:
                    self._pending.popitem(last=False)
            out.append({"hit": False, "response": None, "similarity": found.get("similarity"),
                        "matched_prompt": None, "entry_id": None, "exact": False})
        return out

    async def store(self, prompt: str, response: str, namespace: str = "default",
                    history: Optional[list] = None, ttl_s: Optional[float] = None) -> int:
        entry_id = await self.inner.store(prompt, response, namespace, history, ttl_s)
        self._judge_stored(namespace, prompt, response, history)
        return entry_id

    async def store_batch(self, prompts: list[str], responses: list[str], namespace: str = "default",
                          history: Optional[list] = None, ttl_s: Optional[float] = None) -> list[int]:
        batch = getattr(self.inner, "store_batch", None)
        if batch is None:
            entry_ids = [await self.inner.store(p, r, namespace, history, ttl_s)
                         for p, r in zip(prompts, responses)]
        else:
            entry_ids = await batch(prompts, responses, namespace, history, ttl_s)
        for prompt, response in zip(prompts, responses):
            self._judge_stored(namespace, prompt, response, history)
        return entry_ids

    def _judge_stored(self, namespace: str, prompt: str, response: str, history: Optional[list]) -> None:
        """A fresh answer stored for a prompt picked for verification: judge it in the background."""
        pending = self._pending.pop(_key(namespace, prompt, history), None)
        if pending is not None:
            task = asyncio.get_running_loop().create_task(
                self._verify(namespace, prompt, response, *pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _verify(self, namespace: str, prompt: str, fresh: str, rid: int, kind: str,
                      matched_prompt: Optional[str], cached: Optional[str],
                      similarity: Optional[float]) -> None:
        if matched_prompt is None or cached is None:
            return
        try:
            p_yes = await asyncio.to_thread(self.judge.judge, prompt, matched_prompt, cached, fresh)
        except Exception as exc:
            logger.error("verification judge failed (%s)", exc)
            return
        if p_yes is None:
            return
        wrong = p_yes < 0.5
        self.policy.record(namespace, rid, wrong)
        bound = self.policy.bound(namespace)
        self.metrics.record(namespace, kind, wrong, bound["threshold"], bound["ucb"])
        if self.sink is not None:
            await asyncio.to_thread(self.sink.append, {
                "prompt_a": prompt, "prompt_b": matched_prompt, "label": float(p_yes),
                "namespace": namespace, "similarity": similarity, "kind": kind,
                "teacher": self.judge.name, "verified_at": time.time()})

    async def drain(self) -> None:
        """Wait for the background verifications (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stats(self) -> dict:
        stats = dict(await self.inner.stats())
        served = dict(self._served)
        stats["engine_candidates"] = {k: stats.get(k) for k in ("hits", "misses", "hit_rate")}
        if "lookups" in stats and stats["lookups"]:
            # the engine counts candidates at the floor; report what the callers were served
            stats["hits"] = served["hits"]
            stats["misses"] = stats["lookups"] - served["hits"]
            stats["hit_rate"] = served["hits"] / stats["lookups"]
        online = self.policy.stats()
        online.update(served=served, pending=len(self._pending), judge=self.judge.name,
                      verified_pairs=None if self.sink is None else
                      {"folder": self.sink.folder, "written": self.sink.written,
                       "buffered": len(self.sink._rows)})
        stats["online"] = online
        return stats

    async def clear(self, namespace: Optional[str] = None) -> int:
        return await self.inner.clear(namespace)


# ----------------------------------------------------------------------------- wiring
def online_settings(cfg) -> Optional[dict]:
    """For a ServeConfig with ``verify.online``: the verification settings the ingress needs (the
    start threshold from the policy file, else ``cache.threshold``; δ likewise), else None."""
    v = cfg.verify
    if not v.online:
        return None
    threshold, delta = cfg.cache.threshold, cfg.cache.target_false_hit
    if cfg.cache.policy_file:
        from raycache.calibration import PolicyFile

        pf = PolicyFile.read(cfg.cache.policy_file)
        threshold = pf.threshold if pf.threshold is not None else cfg.cache.threshold
        delta = pf.delta
    return {"threshold": threshold, **v.model_dump(),
            "settings": OnlineSettings(delta=delta, confidence=cfg.cache.confidence,
                                       verify_near=v.verify_near, verify_far=v.verify_far,
                                       near_margin=v.near_margin, explore=v.explore,
                                       explore_margin=v.explore_margin, window=v.window,
                                       min_verified=v.min_verified, floor=v.floor).__dict__}


def engine_cache_config(cfg) -> dict:
    """The CacheEngine's cache config: with online verification, a static threshold at the online
    policy's candidate floor (the ingress decides); otherwise ``cfg.cache`` unchanged."""
    setup = online_settings(cfg)
    if setup is None:
        return cfg.cache.model_dump()
    floor = OnlinePolicy(setup["threshold"], OnlineSettings(**setup["settings"])).candidate_floor
    return cfg.cache.model_copy(update={"policy": "static", "policy_file": None,
                                        "threshold": floor}).model_dump()


def wrap_backend(backend: Any, setup: Optional[dict]) -> Any:
    """``backend`` wrapped in a :class:`VerifyingBackend` per ``setup`` (:func:`online_settings`),
    or unchanged when it is None."""
    if not setup:
        return backend
    policy = OnlinePolicy(setup["threshold"], OnlineSettings(**setup["settings"]))
    judge = Judge(setup["judge"], setup.get("judge_model"), setup.get("judge_endpoint"),
                  setup.get("judge_api_key_env", "OPENAI_API_KEY"))
    sink = (PairSink(setup["verified_pairs_out"], setup.get("flush_rows", 100))
            if setup.get("verified_pairs_out") else None)
    return VerifyingBackend(backend, policy, judge, sink)
