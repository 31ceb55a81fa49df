"""Backbone features of a dataset, computed once and served from memory.

The backbone is frozen, so training does not need to run it every step: the DataModule serves
these tensors instead of images (see `AnomalyDataModule.cache_features`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@torch.inference_mode()
def extract_features(
    encode: Callable[[Tensor], Tensor],
    dataset: Dataset,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> Tensor:
    """Run `encode` over every image of `dataset` in order -> float32 CPU tensor [N, C, h, w]."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks = [encode(batch["image"].to(device)).float().cpu() for batch in tqdm(loader, desc=desc, leave=False)]
    return torch.cat(chunks)


class FeatureDataset(Dataset):
    """Cached features [N, C, h, w] as a dataset of {"features": [C, h, w]} items."""

    def __init__(self, features: Tensor) -> None:
        self.features = features

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"features": self.features[index]}
