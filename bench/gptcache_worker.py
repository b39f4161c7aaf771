"""GPTCache in its own process and virtualenv, driven over stdin/stdout (one JSON object per line).

Run by ``bench/service.py`` with the GPTCache virtualenv's python; imports nothing from raycache.
Setup follows GPTCache's README semantic-cache example: SBERT embedding (here the same local
all-MiniLM-L6-v2 folder raycache uses), the SQLite + FAISS data manager with ``max_size`` 100,000
(its default, 1,000, would evict within a run; 100,000 is raycache's default capacity),
``SearchDistanceEvaluation`` and the default ``Config`` (``similarity_threshold`` 0.8). Every reply carries ``s``: the seconds
the GPTCache call itself took, measured here so the pipe is not counted.

Requests: {"op": "init", "model": DIR, "dir": DIR[, "similarity_threshold": x]}, {"op": "get",
"prompt": P}, {"op": "put", "prompt": P, "answer": A}, {"op": "quit"}.
"""

from __future__ import annotations

import json
import sys
import time

MAX_SIZE = 100_000  # entries before GPTCache's data manager evicts (= raycache's default capacity)


def init(model: str, data_dir: str, similarity_threshold: float | None = None) -> dict:
    from gptcache import Cache, Config
    from gptcache.embedding import SBERT
    from gptcache.manager import CacheBase, VectorBase, get_data_manager
    from gptcache.processor.pre import get_prompt
    from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

    embedding = SBERT(model)
    data_manager = get_data_manager(
        CacheBase("sqlite", sql_url=f"sqlite:///{data_dir}/gptcache.db"),
        VectorBase("faiss", dimension=embedding.dimension, index_path=f"{data_dir}/faiss.index"),
        max_size=MAX_SIZE)
    config = Config() if similarity_threshold is None else Config(similarity_threshold=similarity_threshold)
    evaluation = SearchDistanceEvaluation()
    cache = Cache()
    cache.init(pre_embedding_func=get_prompt, embedding_func=embedding.to_embeddings,
               data_manager=data_manager, similarity_evaluation=evaluation, config=config)
    lo, hi = evaluation.range()
    # score = max_distance - squared L2 = 2 + 2 cos for unit vectors; hit iff score >= range * threshold
    score_threshold = (hi - lo) * config.similarity_threshold
    return {"cache": cache, "info": {
        "gptcache_version": __import__("gptcache").__version__,
        "similarity_threshold": config.similarity_threshold, "evaluation": type(evaluation).__name__,
        "max_distance": evaluation.max_distance, "cosine_threshold_equivalent": (score_threshold - 2.0) / 2.0,
        "top_k": 1, "data_manager": "sqlite + faiss", "max_size": MAX_SIZE}}


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
    from gptcache.adapter.api import get, put

    cache = None
    for line in stdin:
        req = json.loads(line)
        op = req.get("op")
        if op == "quit":
            break
        if op == "init":
            state = init(req["model"], req["dir"], req.get("similarity_threshold"))
            cache, reply = state["cache"], {"ok": True, **state["info"]}
        elif op == "get":
            start = time.perf_counter()
            answer = get(req["prompt"], cache_obj=cache)
            reply = {"answer": answer, "s": time.perf_counter() - start}
        elif op == "put":
            start = time.perf_counter()
            put(req["prompt"], req["answer"], cache_obj=cache)
            reply = {"ok": True, "s": time.perf_counter() - start}
        else:
            reply = {"error": f"unknown op {op!r}"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


if __name__ == "__main__":
    serve()
