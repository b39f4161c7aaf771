"""Mine candidate prompt pairs for the teacher: k nearest neighbours under the base encoder + random.

Near neighbours are the hard cases (topic-similar, maybe a different answer); random pairs keep the
easy negatives in the mix. Prompts are embedded with Ray Data (an encoder actor pool); the kNN search
uses the FAISS index from ``raycache.index``. Output columns: ``prompt_a, prompt_b, similarity,
source ('knn'|'random'), pair_id`` plus ``answers_a/_b`` and ``group_a/_b`` carried over from the
prompt set when present (the reference teacher uses them).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from raycache.config import MineConfig
from raycache.index import FlatIndex

logger = logging.getLogger(__name__)

CARRIED = ("answers", "group")


def knn_pairs(vecs: np.ndarray, k: int, min_similarity: float = -1.0,
              chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unordered kNN pairs (i < j) over vectors [n, dim] -> (i [m], j [m], cosine [m]), deduplicated."""
    n = len(vecs)
    index = FlatIndex(vecs.shape[1])
    index.add(np.arange(n), vecs)
    kk = min(k + 1, n)
    rows_i, rows_j, rows_s = [], [], []
    for start in range(0, n, chunk):
        sims, ids = index.search(vecs[start:start + chunk], kk)
        src = np.repeat(np.arange(start, start + len(ids)), kk)
        ids, sims = ids.reshape(-1), sims.reshape(-1)
        keep = (ids >= 0) & (ids != src) & (sims >= min_similarity)
        rows_i.append(src[keep])
        rows_j.append(ids[keep])
        rows_s.append(sims[keep])
    i, j, s = np.concatenate(rows_i), np.concatenate(rows_j), np.concatenate(rows_s)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, first = np.unique(lo * n + hi, return_index=True)
    return lo[first], hi[first], s[first]


def random_pairs(n: int, count: int, rng: np.random.Generator,
                 exclude: set[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct random unordered pairs (i < j) of n items, avoiding ``exclude``."""
    exclude = set(exclude or ())
    max_pairs = n * (n - 1) // 2 - len(exclude)
    count = max(0, min(count, max_pairs))
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < count:
        a = rng.integers(0, n, size=2 * (count - len(chosen)) + 8)
        b = rng.integers(0, n, size=len(a))
        for x, y in zip(a.tolist(), b.tolist()):
            if x == y:
                continue
            pair = (min(x, y), max(x, y))
            if pair not in exclude and pair not in chosen:
                chosen.add(pair)
                if len(chosen) == count:
                    break
    arr = np.array(sorted(chosen), dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def build_pairs(prompts: pd.DataFrame, vecs: np.ndarray, k: int, random_per_prompt: float,
                seed: int = 0, min_similarity: float = -1.0) -> pd.DataFrame:
    """Pairs frame from prompts [n rows] and their embeddings [n, dim] (see module doc)."""
    from raycache.data import pair_id

    # one row per distinct prompt text: identical texts are not a useful pair
    keep = ~prompts["prompt"].duplicated().to_numpy()
    prompts, vecs = prompts[keep].reset_index(drop=True), vecs[keep]
    n = len(prompts)
    if n < 2:
        raise ValueError(f"need at least 2 distinct prompts to mine pairs, got {n}")
    rng = np.random.default_rng(seed)
    ki, kj, ks = knn_pairs(vecs, k, min_similarity)
    ri, rj = random_pairs(n, int(round(random_per_prompt * n)), rng, set(zip(ki.tolist(), kj.tolist())))
    rs = np.einsum("ij,ij->i", vecs[ri], vecs[rj]) if len(ri) else np.zeros(0, np.float32)
    i, j = np.concatenate([ki, ri]), np.concatenate([kj, rj])
    text = prompts["prompt"].to_numpy(dtype=object)
    out = pd.DataFrame({
        "prompt_a": text[i],
        "prompt_b": text[j],
        "similarity": np.concatenate([ks, rs]).astype(np.float32),
        "source": ["knn"] * len(ki) + ["random"] * len(ri),
    })
    for col in CARRIED:
        if col in prompts:
            values = prompts[col].to_numpy(dtype=object)
            out[f"{col}_a"], out[f"{col}_b"] = values[i], values[j]
    out["pair_id"] = [pair_id(a, b) for a, b in zip(out["prompt_a"], out["prompt_b"])]
    return out


def run(cfg: MineConfig) -> dict:
    """``raycache mine``: embed the prompt set on Ray Data, mine pairs, write ``cfg.out``."""
    import ray

    from raycache.data import parse_columns, read_dataset, write_table
    from raycache.ray_embed import collect_embeddings, embed_dataset

    start = time.time()
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    ds = read_dataset(cfg.prompts, "prompts", columns=parse_columns(cfg.read.columns),
                      skip_invalid=cfg.read.skip_invalid)
    ds = embed_dataset(ds, cfg.encoder, num_actors=cfg.num_actors)
    prompts, vecs = collect_embeddings(ds)
    embed_s = time.time() - start
    pairs = build_pairs(prompts, vecs, cfg.k, cfg.random_per_prompt, cfg.seed, cfg.min_similarity)
    write_table(pairs, cfg.out)
    summary = {
        "prompts": len(prompts), "pairs": len(pairs),
        "knn_pairs": int((pairs["source"] == "knn").sum()),
        "random_pairs": int((pairs["source"] == "random").sum()),
        "embed_seconds": round(embed_s, 2), "prompts_per_s": round(len(prompts) / max(embed_s, 1e-9), 1),
        "seconds": round(time.time() - start, 2), "out": cfg.out,
    }
    logger.info("mined %(pairs)d pairs from %(prompts)d prompts in %(seconds).1fs", summary)
    return summary
