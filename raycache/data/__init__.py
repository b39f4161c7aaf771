"""Prompts, prompt pairs and request streams on disk: one import path for both reader stacks.

* :mod:`raycache.data.tables`: pandas / pyarrow readers and writers (``read_table``, ``read_prompts``,
  ``read_pairs``, ``read_stream``, ``write_table``), schemas and validation, ``DataError``, the column
  mapping, ``normalize_text``, ``pair_id``, ``stream_namespaces``;
* :mod:`raycache.data.ray_readers`: ``read_dataset``, the same files as a Ray Dataset.

Every public name is re-exported here (``from raycache.data import read_pairs, read_dataset``).
"""

from raycache.data import ray_readers as _ray_readers
from raycache.data import tables as _tables
from raycache.data.ray_readers import read_dataset  # noqa: F401  (re-export)
from raycache.data.tables import (  # noqa: F401  (re-exports: __all__ below; MAX_SKIPPED_EXAMPLES as before)
    KINDS,
    MAX_SKIPPED_EXAMPLES,
    DataError,
    Schema,
    normalize_text,
    pair_id,
    parse_columns,
    read_pairs,
    read_prompts,
    read_stream,
    read_table,
    stream_namespaces,
    validate_frame,
    write_table,
)

__all__ = [*_tables.__all__, *_ray_readers.__all__]
