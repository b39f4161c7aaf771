"""Embed a text column of a Ray Dataset with an actor pool of encoders.

Shared by mining, simulation and the pipeline. Each actor loads its encoder(s) once and embeds
batches. The pool is sized by the caller (``num_actors``); :func:`default_pool` sizes it for this
cluster: on a small CPU machine one actor whose torch threads use every CPU (Ray reserves one CPU
for it, so Ray Data's read tasks still find one), on a bigger one an actor per few CPUs.

Progress: :func:`collect_embeddings` and :func:`embed_texts` advance the driver's open progress
stage (:mod:`raycache.progress`) by the rows they receive.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from raycache.config import EncoderConfig

#: rows per batch handed to an actor (the encoder cuts them into batches of ``batch_size``)
MAP_BATCH_ROWS = 256
#: rows per batch the driver pulls back (progress granularity)
COLLECT_BATCH_ROWS = 256


def _cluster_cpus() -> int:
    try:
        import ray

        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # pragma: no cover
        pass
    return max(1, os.cpu_count() or 1)


def default_pool(num_gpus: float = 0.0, num_actors: Optional[int] = None) -> dict:
    """``{num_actors, threads}`` for embedding on this cluster.

    With GPUs: one actor per GPU. On CPUs, an encoder scales well to 2-4 threads, and an actor per
    CPU would starve Ray Data's read tasks on a small machine: so one actor per 4 CPUs (at least
    one, leaving one CPU unreserved), each with up to 4 threads (``num_actors`` given: the threads
    that share the CPUs among that many).
    """
    if num_gpus:
        return {"num_actors": num_actors or 1, "threads": 1}
    cpus = _cluster_cpus()
    actors = num_actors or (max(1, (cpus - 1) // 4) if cpus > 4 else 1)
    threads = max(1, min(4, cpus // actors))
    return {"num_actors": actors, "threads": threads}


def _set_threads(device: str, threads: Optional[int]) -> None:
    import torch

    if device in ("auto", "cpu") and not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(threads or 1)))


class EncodeBatch:
    """Ray Data callable class: numpy batch {column: [n]} -> same batch + ``embedding`` [n, dim]."""

    def __init__(self, encoder_cfg: dict[str, Any], column: str = "prompt", threads: Optional[int] = 1):
        from raycache.encoder import Encoder

        cfg = EncoderConfig.model_validate(encoder_cfg)
        _set_threads(cfg.device, threads)
        self.encoder = Encoder.from_config(cfg)
        self.batch_size = cfg.batch_size
        self.column = column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.column]]
        batch["embedding"] = self.encoder.encode(texts, batch_size=self.batch_size)
        return batch


class EncodeMulti:
    """Ray Data callable class: one column embedded by several models -> ``embedding_<i>`` columns."""

    def __init__(self, encoder_cfg: dict[str, Any], models: Sequence[Optional[str]],
                 column: str = "prompt", threads: Optional[int] = 1):
        from raycache.encoder import Encoder

        cfg = EncoderConfig.model_validate(encoder_cfg)
        _set_threads(cfg.device, threads)
        self.encoders = [Encoder.from_config(cfg, m) for m in models]
        self.batch_size = cfg.batch_size
        self.column = column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.column]]
        for i, encoder in enumerate(self.encoders):
            batch[f"embedding_{i}"] = encoder.encode(texts, batch_size=self.batch_size)
        return batch


def embed_dataset(ds, encoder_cfg: EncoderConfig, column: str = "prompt", num_actors: Optional[int] = 1,
                  num_cpus: float = 1.0, num_gpus: float = 0.0, threads: Optional[int] = None):
    """Lazily add an ``embedding`` column (float32 [dim] per row) to a Ray Dataset.

    ``num_actors=None`` / ``threads=None``: sized by :func:`default_pool` (the CPUs shared among
    the actors).
    """
    from ray.data import ActorPoolStrategy

    pool = default_pool(num_gpus, num_actors)
    num_actors, threads = pool["num_actors"], threads or pool["threads"]
    return ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"encoder_cfg": encoder_cfg.model_dump(), "column": column,
                               "threads": threads},
        batch_size=max(encoder_cfg.batch_size, MAP_BATCH_ROWS),
        batch_format="numpy",
        compute=ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def collect_embeddings(ds) -> tuple["pd.DataFrame", np.ndarray]:
    """Materialise (the other columns as a DataFrame, embeddings [n, dim] float32), row-aligned."""
    import pandas as pd

    from raycache import progress

    columns: dict[str, list] = {}
    chunks = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=COLLECT_BATCH_ROWS):
        chunks.append(np.asarray(batch.pop("embedding"), dtype=np.float32))
        for name, values in batch.items():
            columns.setdefault(name, []).extend(
                v.tolist() if isinstance(v, np.ndarray) else v for v in values)
        progress.update(len(chunks[-1]))
    if not chunks:
        return pd.DataFrame(), np.zeros((0, 0), np.float32)
    return pd.DataFrame(columns), np.concatenate(chunks)


def embed_texts(texts: Sequence[str], models: Sequence[Optional[str]], encoder_cfg: EncoderConfig,
                num_actors: Optional[int] = None, threads: Optional[int] = None) -> list[np.ndarray]:
    """Embed ``texts`` with each of ``models`` in one Ray Data pass -> one float32 [len(texts), dim]
    array per model, in input order. Each distinct text is embedded once per model."""
    import pandas as pd
    import ray.data
    from ray.data import ActorPoolStrategy

    codes, uniques = pd.factorize(pd.Series(list(texts), dtype=object))
    n, k = len(uniques), len(models)
    if n == 0:
        return [np.zeros((0, 0), np.float32) for _ in models]
    pool = default_pool(0.0, num_actors)
    num_actors, threads = pool["num_actors"], threads or pool["threads"]
    ds = ray.data.from_pandas(pd.DataFrame({"prompt": [str(u) for u in uniques], "row": np.arange(n)}))
    ds = ds.map_batches(
        EncodeMulti,
        fn_constructor_kwargs={"encoder_cfg": encoder_cfg.model_dump(), "models": list(models),
                               "threads": threads},
        batch_size=max(encoder_cfg.batch_size, MAP_BATCH_ROWS), batch_format="numpy",
        compute=ActorPoolStrategy(size=num_actors), num_cpus=1.0)
    out: list[Optional[np.ndarray]] = [None] * k
    filled = 0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=COLLECT_BATCH_ROWS):
        rows = batch["row"]
        for i in range(k):
            vecs = np.asarray(batch[f"embedding_{i}"], dtype=np.float32)
            if out[i] is None:
                out[i] = np.zeros((n, vecs.shape[1]), np.float32)
            out[i][rows] = vecs
        filled += len(rows)
    if filled != n:
        raise RuntimeError(f"embedding returned {filled} of {n} texts")
    return [vecs[codes] for vecs in out]

