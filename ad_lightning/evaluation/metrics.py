"""Threshold-free detection metrics on raw anomaly scores (METHODS.md section 9).

torchmetrics' binary metrics push float inputs outside [0, 1] through a sigmoid, which saturates
large raw scores (an NLL of 1e4) into ties and silently wrecks the AUROC. Scores are therefore
first mapped into [0, 1] by their dense rank: an order- and tie-preserving map, so every
rank-based metric is unchanged and no value saturates.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc


def to_unit_interval(scores: Tensor) -> Tensor:
    """Dense ranks scaled to [0, 1]: keeps order and ties exactly, any scale or offset."""
    scores = scores.flatten()
    if not torch.isfinite(scores).all():
        raise ValueError("anomaly scores contain NaN or inf; the model or head produced invalid values")
    _, rank = torch.unique(scores, sorted=True, return_inverse=True)
    top = max(int(rank.max()), 1) if rank.numel() else 1
    return rank.to(torch.float64) / top


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of raw scores against binary labels (NaN if one class is absent)."""
    labels = labels.flatten().long()
    if scores.numel() != labels.numel():
        raise ValueError(f"{scores.numel()} scores but {labels.numel()} labels")
    if labels.min() == labels.max():
        return float("nan")
    return float(binary_auroc(to_unit_interval(scores), labels))


def image_auroc(image_scores: Tensor, labels: Tensor) -> float:
    """Image-level AUROC: one score per image [N] against its label [N]."""
    return auroc(image_scores, labels)


def pixel_auroc(maps: Tensor, masks: Tensor) -> float:
    """Pixel-level AUROC over every pixel of every image: maps [N, H, W] against masks [N, H, W]."""
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
    return auroc(maps, masks > 0.5)
