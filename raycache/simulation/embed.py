"""Stream vectors for a replay: which model, each distinct prompt embedded once (Ray Data), or a
precomputed ``.npy`` memory-mapped and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from raycache.config import EncoderConfig
from raycache.data import DataError
from raycache.io import atomic_path


def resolve_model(model: Optional[str]) -> Optional[str]:
    """None (the embedded default) for None or the aliases 'default'/'base' (unless a folder of
    that name exists), else the model folder / hub id unchanged."""
    from raycache.encoder import is_default_model

    if is_default_model(model):
        return None
    return model



def embed_prompts(prompts: Sequence[str], encoder_cfg: EncoderConfig) -> np.ndarray:
    """Embed prompts with Ray Data (one encoder actor, 1 CPU) -> float32 [len(prompts), dim].

    Rows are matched back by an explicit index column, so the result is in input order whatever
    order Ray Data finishes batches in.
    """
    import ray.data

    from raycache.ray_embed import embed_dataset

    n = len(prompts)
    ds = ray.data.from_pandas(pd.DataFrame({"prompt": list(prompts), "row": np.arange(n)}))
    ds = embed_dataset(ds, encoder_cfg, num_actors=1, num_cpus=1.0)
    out: Optional[np.ndarray] = None
    filled = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
        vecs = batch["embedding"]
        vecs = np.stack(vecs) if vecs.dtype == object else vecs
        if out is None:
            out = np.zeros((n, vecs.shape[1]), np.float32)
        out[batch["row"]] = vecs
        filled += len(vecs)
    if out is None or filled != n:
        raise RuntimeError(f"embedding returned {filled} of {n} prompts")
    return out


def embed_stream(prompts: Sequence[str], encoder_cfg: EncoderConfig, out_path: Path,
                 chunk_size: int = 65536) -> np.ndarray:
    """Embed each distinct prompt once, write the stream-order matrix [n, dim] to ``out_path``
    (.npy, reusable as ``--embeddings``) chunk by chunk, and return it memory-mapped."""
    codes, uniques = pd.factorize(pd.Series(prompts, dtype=object))
    unique_vecs = embed_prompts(list(uniques), encoder_cfg)
    with atomic_path(out_path, keep_mode=True) as tmp:
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                           shape=(len(codes), unique_vecs.shape[1]))
        for start in range(0, len(codes), chunk_size):
            matrix[start:start + chunk_size] = unique_vecs[codes[start:start + chunk_size]]
        matrix.flush()
        del matrix
    return np.load(out_path, mmap_mode="r")


def load_embeddings(path: str, n_arrivals: int) -> np.ndarray:
    """Memory-map precomputed stream embeddings (.npy, float32 [n_arrivals, dim])."""
    try:
        vectors = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"embeddings file not found: {path}") from None
    except ValueError as exc:
        raise DataError(f"{path}: not a .npy array ({exc})") from None
    if vectors.ndim != 2 or vectors.shape[0] != n_arrivals:
        raise DataError(f"{path}: shape {tuple(vectors.shape)}; expected [{n_arrivals}, dim], "
                        f"one row per arrival of the stream")
    if vectors.dtype != np.float32:
        raise DataError(f"{path}: dtype {vectors.dtype}; expected float32")
    return vectors


def ensure_ray() -> None:
    """A local Ray for the embedding jobs, unless one is already up."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
