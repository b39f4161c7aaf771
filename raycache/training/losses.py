"""Distillation losses on the similarity head's logits against the teacher's soft labels.

Both losses take ``logits`` z = cos/λ − c of shape [n] (so P = sigmoid(z)) and ``targets`` y of
shape [n], the teacher's P(yes) in [0, 1], and return the mean over the batch (a scalar).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_shapes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "must have the same shape [n]")


class BCELoss(nn.Module):
    """Binary cross-entropy with soft targets: mean of −[y log P + (1 − y) log(1 − P)].

    Computed from the logit z (P = sigmoid(z)) as softplus(z) − y·z, which stays finite for any z;
    its gradient is dL/dz = (P − y) / n.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


class SLDLoss(nn.Module):
    """Squared log-odds difference: mean of (logit(P) − logit(clip(y, ε, 1 − ε)))².

    logit(P) is the head's logit z itself, so no sigmoid/log round trip; dL/dz = 2(z − t) / n with
    t = logit(clip(y, ε, 1 − ε)).

    ε (default 0.01) exists because hard or saturated teacher labels (y = 0 or 1) have infinite
    log-odds. Clipping to [0.01, 0.99] caps the target at ±log(99) ≈ ±4.6: a sure label asks for 99%
    confidence rather than an unbounded logit, and confidence differences beyond 99% (which an
    LLM's answer-token probability does not measure reliably) are not chased.
    """

    def __init__(self, eps: float = 0.01):
        super().__init__()
        if not 0.0 < eps < 0.5:
            raise ValueError(f"SLD eps must be in (0, 0.5), got {eps}")
        self.eps = float(eps)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        target_logits = torch.logit(targets.float().clamp(self.eps, 1.0 - self.eps))
        return (logits.float() - target_logits).pow(2).mean()


def build_loss(name: str, sld_eps: float = 0.01) -> nn.Module:
    """'bce' -> BCELoss(), 'sld' -> SLDLoss(sld_eps)."""
    if name == "bce":
        return BCELoss()
    if name == "sld":
        return SLDLoss(sld_eps)
    raise ValueError(f"unknown loss {name!r}; expected 'bce' or 'sld'")
