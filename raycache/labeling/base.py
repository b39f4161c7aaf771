"""The teacher interface every labeling backend implements (:class:`Teacher`), its verdict type
(:data:`Judgement`), the label columns it adds (:data:`LABEL_COLUMNS`, :func:`with_label_columns`) and
:class:`TeacherError`. The backends (``backends``, ``vllm_backend``) import it; it imports neither.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

import numpy as np

from raycache.config import ConfigError, LabelConfig

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    import ray.data

__all__ = ["LABEL_COLUMNS", "Judgement", "Teacher", "TeacherError", "with_label_columns"]

LABEL_COLUMNS = ("label", "teacher", "error")
# One teacher verdict: (P(yes) or None, error message or None); exactly one of the two is set.
Judgement = tuple[Optional[float], Optional[str]]


class TeacherError(RuntimeError):
    """A teacher can't be set up or run at all (model not loadable, no GPUs, missing package)."""


class Teacher(ABC):
    """A labeling backend. The ``check_*`` class methods run on the driver before any pair is
    labelled, so a misconfigured job fails at once; ``label_dataset`` adds the label columns."""

    kind: ClassVar[str]

    @classmethod
    def check_config(cls, cfg: LabelConfig) -> None:
        """Raise ConfigError when a flag this backend needs is missing."""

    @classmethod
    def require_model(cls, cfg: LabelConfig, what: str = "a model folder or hub id") -> None:
        """ConfigError unless ``--teacher-model`` is set."""
        if not cfg.teacher_model:
            raise ConfigError(f"--teacher {cls.kind} needs --teacher-model ({what})")

    @classmethod
    def check_cluster(cls, cfg: LabelConfig) -> None:
        """Raise TeacherError when the Ray cluster can't run this backend (e.g. no GPUs)."""

    @classmethod
    def check_columns(cls, columns: Sequence[str]) -> None:
        """Raise ConfigError when the pairs lack a column this backend needs."""

    @classmethod
    def display_name(cls, cfg: LabelConfig) -> str:
        """The ``teacher`` column value: backend and model."""
        return f"{cls.kind}:{cfg.teacher_model}"

    @classmethod
    @abstractmethod
    def label_dataset(cls, ds: "ray.data.Dataset", cfg: LabelConfig,
                      columns: Sequence[str]) -> "ray.data.Dataset":
        """``ds`` (pairs, with ``columns``) plus ``label``, ``teacher``, ``error``, which replace any
        input columns of those names."""


def with_label_columns(table: "pa.Table", labels: Sequence[float], teachers: Sequence[str],
                       errors: Sequence[Optional[str]]) -> "pa.Table":
    """``table`` without any old label columns, plus typed ``label``/``teacher``/``error``."""
    import pyarrow as pa

    table = table.drop_columns([c for c in LABEL_COLUMNS if c in table.column_names])
    label = pa.array(np.asarray(labels, dtype=np.float64), type=pa.float64(), from_pandas=True)
    table = table.append_column("label", label)
    table = table.append_column("teacher", pa.array(list(teachers), type=pa.string()))
    return table.append_column("error", pa.array(list(errors), type=pa.string()))
