"""Distillation fine-tuning: similarity head, BCE/SLD losses, the Ray Train loop and job.

``raycache.training.job.run(cfg)`` is the ``raycache train`` stage; the head and losses are
importable on their own (no Ray needed).
"""

from raycache.training.head import HEAD_FILE, PairScorer, SimilarityHead
from raycache.training.losses import BCELoss, SLDLoss, build_loss

__all__ = ["HEAD_FILE", "BCELoss", "PairScorer", "SLDLoss", "SimilarityHead", "build_loss"]
