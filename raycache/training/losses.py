"""Distillation losses on the similarity head's logits against the teacher's soft labels.

The pointwise losses (BCE, SLD) take ``logits`` z = cos/λ − c of shape [n] (so P = sigmoid(z)) and
``targets`` y of shape [n], the teacher's P(yes) in [0, 1], and return a weighted mean over the batch
(a scalar). ``negative_weight`` w scales each pair's term by 1 + (w − 1)(1 − y): a serving false hit
costs more than a missed hit, so pairs the teacher calls "different answer" can count w times.

``InBatchContrastiveLoss`` works on the embeddings instead: each positive pair's prompt against every
other prompt of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_shapes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "must have the same shape [n]")


def _pair_weights(targets: torch.Tensor, negative_weight: float) -> torch.Tensor:
    """w_i = 1 + (w − 1)(1 − y_i) [n]: 1 for a sure positive, w for a sure negative."""
    return 1.0 + (negative_weight - 1.0) * (1.0 - targets)


def _check_weight(negative_weight: float) -> float:
    if not negative_weight > 0:
        raise ValueError(f"negative_weight must be > 0, got {negative_weight}")
    return float(negative_weight)


class BCELoss(nn.Module):
    """Binary cross-entropy with soft targets: Σ w_i·ℓ_i / Σ w_i, ℓ = −[y log P + (1 − y) log(1 − P)].

    Computed from the logit z (P = sigmoid(z)) as softplus(z) − y·z, which stays finite for any z;
    with w = 1 (the default) it is the plain mean and dL/dz = (P − y) / n.
    """

    def __init__(self, negative_weight: float = 1.0):
        super().__init__()
        self.negative_weight = _check_weight(negative_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        y = targets.float()
        if self.negative_weight == 1.0:
            return F.binary_cross_entropy_with_logits(logits.float(), y)
        w = _pair_weights(y, self.negative_weight)
        per_pair = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")
        return (w * per_pair).sum() / w.sum()


class SLDLoss(nn.Module):
    """Squared log-odds difference: mean of (logit(P) − logit(clip(y, ε, 1 − ε)))².

    logit(P) is the head's logit z itself, so no sigmoid/log round trip; dL/dz = 2(z − t) / n with
    t = logit(clip(y, ε, 1 − ε)).

    ε (default 0.01) exists because hard or saturated teacher labels (y = 0 or 1) have infinite
    log-odds. Clipping to [0.01, 0.99] caps the target at ±log(99) ≈ ±4.6: a sure label asks for 99%
    confidence rather than an unbounded logit, and confidence differences beyond 99% (which an
    LLM's answer-token probability does not measure reliably) are not chased.

    With ``negative_weight`` w ≠ 1 the mean is weighted as in BCELoss: Σ w_i (z_i − t_i)² / Σ w_i.
    """

    def __init__(self, eps: float = 0.01, negative_weight: float = 1.0):
        super().__init__()
        if not 0.0 < eps < 0.5:
            raise ValueError(f"SLD eps must be in (0, 0.5), got {eps}")
        self.eps = float(eps)
        self.negative_weight = _check_weight(negative_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_shapes(logits, targets)
        y = targets.float()
        target_logits = torch.logit(y.clamp(self.eps, 1.0 - self.eps))
        squared = (logits.float() - target_logits).pow(2)
        if self.negative_weight == 1.0:
            return squared.mean()
        w = _pair_weights(y, self.negative_weight)
        return (w * squared).sum() / w.sum()


class InBatchContrastiveLoss(nn.Module):
    """In-batch contrastive (InfoNCE) term over the positive pairs of a batch.

    For each pair i with y_i ≥ 0.5 (its prompts a_i, b_i embedded as unit vectors [n, dim]):

        ℓ_i = −log( exp(s·cos(a_i, b_i)) / Σ_j exp(s·cos(a_i, x_j)) ),   x ∈ {b_1..b_n, a_1..a_n} \ {a_i}

    averaged over those pairs (0 when the batch has none). s = 1/τ is a fixed scale (default 20).
    Every other prompt of the batch acts as a negative — the unrelated nearest neighbours that make
    a serving false hit, which labelled pairs alone never show the model. ``same`` [n, n] bool
    (optional) marks candidates j that are the same prompt as b_i (or a_i): those are not negatives
    and are left out of the denominator.
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"contrastive scale must be > 0, got {scale}")
        self.scale = float(scale)

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, targets: torch.Tensor,
                same: torch.Tensor | None = None) -> torch.Tensor:
        if emb_a.shape != emb_b.shape or emb_a.ndim != 2 or emb_a.shape[0] != targets.shape[0]:
            raise ValueError(f"embeddings {tuple(emb_a.shape)} / {tuple(emb_b.shape)} and targets "
                             f"{tuple(targets.shape)} must be [n, dim], [n, dim] and [n]")
        positive = targets >= 0.5
        if not bool(positive.any()):
            return emb_a.sum() * 0.0  # keeps the graph (DDP needs every parameter used)
        n = emb_a.shape[0]
        a, b = emb_a.float(), emb_b.float()
        scores = self.scale * (a @ torch.cat([b, a]).T)  # [n, 2n]: candidates b_1..b_n, a_1..a_n
        excluded = torch.zeros_like(scores, dtype=torch.bool)
        excluded[:, n:] = torch.eye(n, dtype=torch.bool, device=scores.device)  # a_i itself
        if same is not None:
            off_diagonal = same & ~torch.eye(n, dtype=torch.bool, device=same.device)
            excluded[:, :n] |= off_diagonal
            excluded[:, n:] |= off_diagonal
        scores = scores.masked_fill(excluded, float("-inf"))
        labels = torch.arange(n, device=scores.device)
        return F.cross_entropy(scores[positive], labels[positive])


def build_loss(name: str, sld_eps: float = 0.01, negative_weight: float = 1.0) -> nn.Module:
    """'bce' -> BCELoss(negative_weight), 'sld' -> SLDLoss(sld_eps, negative_weight)."""
    if name == "bce":
        return BCELoss(negative_weight)
    if name == "sld":
        return SLDLoss(sld_eps, negative_weight)
    raise ValueError(f"unknown loss {name!r}; expected 'bce' or 'sld'")
