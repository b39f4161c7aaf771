"""Embed a text column of a Ray Dataset with an actor pool of encoders.

Shared by mining and simulation. Each actor loads the encoder once and embeds batches; the pool is
sized by the caller (``num_actors``, 1 CPU each by default) so that on a 2-CPU machine one CPU is
left for Ray Data's reading and writing tasks (an actor pool that takes every CPU starves them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raycache.config import EncoderConfig


class EncodeBatch:
    """Ray Data callable class: numpy batch {column: [n]} -> same batch + ``embedding`` [n, dim]."""

    def __init__(self, encoder_cfg: dict[str, Any], column: str = "prompt"):
        import torch

        from raycache.encoder import Encoder

        cfg = EncoderConfig.model_validate(encoder_cfg)
        if cfg.device in ("auto", "cpu") and not torch.cuda.is_available():
            torch.set_num_threads(1)
        self.encoder = Encoder.load(cfg.model, device=cfg.device, max_length=cfg.max_length)
        self.batch_size = cfg.batch_size
        self.column = column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.column]]
        batch["embedding"] = self.encoder.encode(texts, batch_size=self.batch_size)
        return batch


def embed_dataset(ds, encoder_cfg: EncoderConfig, column: str = "prompt", num_actors: int = 1,
                  num_cpus: float = 1.0, num_gpus: float = 0.0):
    """Lazily add an ``embedding`` column (float32 [dim] per row) to a Ray Dataset."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"encoder_cfg": encoder_cfg.model_dump(), "column": column},
        batch_size=max(encoder_cfg.batch_size, 256),
        batch_format="numpy",
        compute=ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def collect_embeddings(ds) -> tuple["pd.DataFrame", np.ndarray]:
    """Materialise (the other columns as a DataFrame, embeddings [n, dim] float32), row-aligned."""
    import pandas as pd

    columns: dict[str, list] = {}
    chunks = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=4096):
        chunks.append(np.asarray(batch.pop("embedding"), dtype=np.float32))
        for name, values in batch.items():
            columns.setdefault(name, []).extend(
                v.tolist() if isinstance(v, np.ndarray) else v for v in values)
    if not chunks:
        return pd.DataFrame(), np.zeros((0, 0), np.float32)
    return pd.DataFrame(columns), np.concatenate(chunks)
