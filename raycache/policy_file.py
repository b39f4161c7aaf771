"""Policy files: what ``raycache calibrate`` writes and the engine, the service and the simulator load
(:class:`PolicyFile`, JSON, checked against the model it was fitted for by :func:`model_identity`;
:func:`load_policy`). Fitting one is :mod:`raycache.calibration`'s job; this module only reads, writes
and checks them, so the cache engine can load one without importing the simulator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from raycache.config import ConfigError
from raycache.io import write_json_atomic

__all__ = ["BOUNDS", "POLICY_FORMAT", "PolicyFile", "load_policy", "model_fingerprint", "model_identity"]

logger = logging.getLogger("raycache.calibration")

BOUNDS = ("per_request", "among_hits")
POLICY_FORMAT = "raycache-policy/1"
SMALL_FILE_BYTES = 2 << 20  # model files hashed whole below this size; larger ones head + tail
EDGE_BYTES = 1 << 20
SKIPPED_FILES = ("README.md", ".gitattributes")


# ----------------------------------------------------------------------------- model identity
def _resolve_model_folder(model: Optional[str]) -> Optional[Path]:
    from raycache.encoder import default_model_path, is_default_model

    if is_default_model(model):
        return default_model_path()
    path = Path(str(model)).expanduser()
    return path if path.is_dir() else None


def model_fingerprint(model: Optional[str]) -> str:
    """``sha256:<16 hex>`` of a model folder: every file's relative path and size, the whole content
    of files under 2 MiB (configs, similarity_head.json, tokenizer) and the first and last MiB of
    larger ones (weights). The same model copied elsewhere has the same fingerprint; a fine-tune
    (new weights and head) does not. A hub id that is not a local folder is fingerprinted by name."""
    folder = _resolve_model_folder(model)
    digest = hashlib.sha256()
    if folder is None:
        digest.update(f"hub:{model}".encode())
        return "sha256:" + digest.hexdigest()[:16]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.name in SKIPPED_FILES or rel.startswith(".") or "/." in rel:
            continue
        size = path.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= SMALL_FILE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(EDGE_BYTES))
                f.seek(size - EDGE_BYTES)
                digest.update(f.read(EDGE_BYTES))
    return "sha256:" + digest.hexdigest()[:16]


def model_identity(model: Optional[str]) -> dict:
    """``{path, fingerprint}``: the model as named (``default`` for the embedded one) and
    :func:`model_fingerprint`."""
    from raycache.encoder import is_default_model

    name = "default" if is_default_model(model) else str(model)
    return {"path": name, "fingerprint": model_fingerprint(model)}


# ----------------------------------------------------------------------------- the policy file
@dataclass
class PolicyFile:
    """What ``raycache calibrate`` writes and the service and simulator load (JSON).

    ``threshold``: None when no threshold qualified (the policy then never hits semantically);
    ``ucb``: the upper confidence bound of the chosen threshold's rate (``bound`` kind);
    ``n_arrivals`` / ``n_hits`` / ``n_false_hits``: the calibration replay at that threshold;
    ``tested``: the fixed sequence as tested, [{threshold, trials, failures, ucb}] high to low;
    ``model``: {path, fingerprint} it was fitted for; ``horizon``: None when ``ucb`` bounds the
    traffic's rate, else the number of requests whose realised rate it bounds.
    """

    threshold: Optional[float]
    delta: float
    confidence: float
    bound: str
    ucb: Optional[float]
    n_arrivals: int
    n_hits: int
    n_false_hits: int
    n_unknown_hits: int
    model: dict
    stream: Optional[str] = None
    method: str = "fixed_sequence"
    created: str = ""
    thresholds_tried: int = 0
    tested: list = field(default_factory=list)
    max_length: Optional[int] = None
    horizon: Optional[int] = None
    format: str = POLICY_FORMAT

    @property
    def qualified(self) -> bool:
        return self.threshold is not None

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.to_dict(), path)
        return path

    @classmethod
    def read(cls, path: str | os.PathLike) -> "PolicyFile":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"policy file not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a JSON policy file ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
            raise ConfigError(f"{path}: not a raycache policy file (expected format {POLICY_FORMAT!r}; "
                              f"write one with `raycache calibrate`)")
        known = {f for f in cls.__dataclass_fields__}
        try:
            policy = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"{path}: incomplete policy file ({exc})") from None
        if policy.bound not in BOUNDS:
            raise ConfigError(f"{path}: bound must be one of {BOUNDS}, got {policy.bound!r}")
        if policy.threshold is not None and not (-1 <= float(policy.threshold) <= 1):
            raise ConfigError(f"{path}: threshold {policy.threshold} is not a cosine in [-1, 1]")
        return policy

    def check_model(self, model: Optional[str], source: str = "the policy file") -> None:
        """ConfigError unless ``model`` has the fingerprint this policy was fitted for."""
        mine = model_identity(model)
        fitted = self.model or {}
        if fitted.get("fingerprint") != mine["fingerprint"]:
            raise ConfigError(
                f"{source} was calibrated for model {fitted.get('path')!r} (fingerprint "
                f"{fitted.get('fingerprint')}), but this run uses {mine['path']!r} (fingerprint "
                f"{mine['fingerprint']}); a threshold does not carry over between encoders. "
                f"Recalibrate: raycache calibrate --stream CALIB --model {mine['path']} --out policy.json")

    def decision_policy(self, path: Optional[str] = None):
        """The engine's decision policy for this file (:class:`raycache.cache.policy.PolicyThreshold`)."""
        from raycache.cache.policy import PolicyThreshold

        threshold = math.inf if self.threshold is None else float(self.threshold)
        meta = {k: v for k, v in self.to_dict().items() if k not in ("tested", "threshold", "format")}
        return PolicyThreshold(threshold=threshold, meta={**meta, "path": path})


def load_policy(path: str, model: Optional[str]) -> PolicyFile:
    """Read a policy file and check it was fitted for ``model`` (ConfigError otherwise)."""
    policy = PolicyFile.read(path)
    policy.check_model(model, f"policy file {path}")
    if not policy.qualified:
        logger.warning("policy file %s: no threshold met δ=%g at calibration; the cache will answer "
                       "exact repeats only", path, policy.delta)
    return policy
