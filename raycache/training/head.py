"""The similarity head P(hit | a, b) = sigmoid(cos(e(a), e(b)) / λ − c) and the pair scorer.

``SimilarityHead`` holds the two learnable scalars (temperature λ > 0 and offset c); ``PairScorer``
puts it on top of an ``Encoder`` so that one module maps two lists of prompts to logits, which is
what DDP wraps during training. A fine-tuned model folder stores the head as
``similarity_head.json`` = ``{"scale": λ, "bias": c}`` next to the transformer files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from raycache.io import write_text_atomic

HEAD_FILE = "similarity_head.json"


class SimilarityHead(nn.Module):
    """Maps cosine similarity [n] to the logit z = cos / λ − c [n]; P(hit) = sigmoid(z).

    λ is stored as log λ, so it stays positive whatever the optimiser does, and a step changes it
    by a relative amount (λ spans orders of magnitude less awkwardly than on a linear scale).
    """

    def __init__(self, scale: float, bias: float):
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"similarity head scale λ must be a positive number, got {scale}")
        if not math.isfinite(bias):
            raise ValueError(f"similarity head bias c must be finite, got {bias}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), dtype=torch.float32))
        self.bias = nn.Parameter(torch.tensor(float(bias), dtype=torch.float32))

    @property
    def scale(self) -> torch.Tensor:
        """λ (a 0-d tensor, > 0)."""
        return self.log_scale.exp()

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        """Logits z = cos / λ − c, same shape as ``cos``."""
        return cos.float() / self.scale - self.bias

    def probability(self, cos: torch.Tensor) -> torch.Tensor:
        """P(hit | a, b) = sigmoid(cos / λ − c), same shape as ``cos``."""
        return torch.sigmoid(self(cos))

    def as_dict(self) -> dict[str, float]:
        return {"scale": float(self.scale.detach()), "bias": float(self.bias.detach())}

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write ``similarity_head.json`` ({"scale": λ, "bias": c}) into the model folder."""
        path = Path(model_dir) / HEAD_FILE
        write_text_atomic(path, json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "SimilarityHead":
        """Read ``similarity_head.json`` from a fine-tuned model folder."""
        path = Path(model_dir) / HEAD_FILE
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no similarity head in this model folder (only fine-tuned models have one)"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from None
        if not isinstance(values, dict) or not {"scale", "bias"} <= values.keys():
            raise ValueError(f"{path}: expected an object with 'scale' and 'bias', got {values!r}")
        try:
            return cls(scale=float(values["scale"]), bias=float(values["bias"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None


class PairScorer(nn.Module):
    """Encoder + SimilarityHead: two lists of n prompts -> logits [n] (with gradients)."""

    def __init__(self, encoder: nn.Module, head: SimilarityHead):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def cosine(self, prompts_a: Sequence[str], prompts_b: Sequence[str]) -> torch.Tensor:
        """cos(e(a_i), e(b_i)) [n]; both sides go through the encoder in one batch of 2n."""
        if len(prompts_a) != len(prompts_b):
            raise ValueError(f"got {len(prompts_a)} prompts_a but {len(prompts_b)} prompts_b")
        n = len(prompts_a)
        emb = self.encoder(list(prompts_a) + list(prompts_b))
        return (emb[:n] * emb[n:]).sum(dim=-1)

    def forward(self, prompts_a: Sequence[str], prompts_b: Sequence[str],
                return_embeddings: bool = False):
        """Logits [n]; with ``return_embeddings``, (logits [n], e(a) [n, dim], e(b) [n, dim])."""
        if len(prompts_a) != len(prompts_b):
            raise ValueError(f"got {len(prompts_a)} prompts_a but {len(prompts_b)} prompts_b")
        n = len(prompts_a)
        emb = self.encoder(list(prompts_a) + list(prompts_b))
        logits = self.head((emb[:n] * emb[n:]).sum(dim=-1))
        return (logits, emb[:n], emb[n:]) if return_embeddings else logits
