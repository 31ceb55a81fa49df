"""Our own 3D-printed parts: the MVTec-AD layout with optional masks and optional tiling of large images."""

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ad_lightning.data.base import AnomalyDataset, Sample
from ad_lightning.data.images import BadInputError, find_mask, probe_image, read_image
from ad_lightning.data.mvtec import MVTecAD
from ad_lightning.data.tiling import Box, extract_tiles, tile_boxes

log = logging.getLogger(__name__)


class Printed3D(MVTecAD):
    """3D-printed parts, one category per part directory:

        <root>/<part>/train/good/*                 normal training images
        <root>/<part>/test/good/*                  normal test images
        <root>/<part>/test/<defect>/*              anomalous test images, one directory per defect type
        <root>/<part>/ground_truth/<defect>/<stem>_mask.png or <stem>.png   optional masks

    Without a `ground_truth` directory a part is image-level only (`has_masks` is False and a
    warning names it). With `tile_size`, every training image is cut into `tile_size` tiles
    overlapping by `tile_overlap` pixels and each tile, resized to `image_size`, is one training
    (or validation) item; test items are whole images at native size, scored tile by tile by the
    model, their maps stitched back to full resolution.
    """

    CATEGORIES = ()
    DATA_HINT = (
        "arrange the images as <root>/<part>/train/good, <root>/<part>/test/good and <root>/<part>/test/<defect>, "
        "with optional masks in <root>/<part>/ground_truth/<defect>/<stem>_mask.png"
    )

    def __init__(
        self,
        root: str | Path,
        category: str | list[str] = "all",
        tile_size: int | None = None,
        tile_overlap: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, category, **kwargs)
        if tile_size is not None and not 0 <= tile_overlap < tile_size:
            raise BadInputError(
                f"tile_overlap={tile_overlap} must be in [0, tile_size={tile_size}); set --data.tile_overlap"
            )
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap

    @property
    def has_masks(self) -> bool:
        return all((self.root / part / "ground_truth").is_dir() for part in self.categories)

    def make_samples(self, category: str) -> tuple[list[Sample], list[Sample]]:
        if not (self.root / category / "ground_truth").is_dir():
            log.warning("part %r has no ground_truth directory under %s: image-level metrics only", category, self.root)
        return super().make_samples(category)

    def _test_samples(self, category_dir: Path, defect_dir: Path) -> list[Sample]:
        """MVTec test samples, with each mask found by stem (`<stem>_mask.png` or `<stem>.png`) or None."""
        mask_dir = category_dir / "ground_truth" / defect_dir.name
        return [
            replace(s, mask_path=self._mask_path(mask_dir, s)) for s in super()._test_samples(category_dir, defect_dir)
        ]

    @staticmethod
    def _mask_path(mask_dir: Path, sample: Sample) -> Path | None:
        if sample.label == 0 or not mask_dir.parent.is_dir():
            return None
        stem = sample.image_path.stem
        return find_mask(mask_dir, [f"{stem}_mask.png", f"{stem}.png"])

    @property
    def tiling(self) -> tuple[int, int] | None:
        return None if self.tile_size is None else (self.tile_size, self.tile_overlap)

    def val_images(self) -> Tensor | None:
        """The image index of every validation tile (tiles of one image are consecutive)."""
        if self.tile_size is None:
            return None
        order = {id(sample): i for i, sample in enumerate(self.val_dataset.samples)}
        return torch.tensor([order[id(sample)] for sample, _ in self.val_dataset.tiles])

    def make_dataset(self, samples: list[Sample], split: str) -> Dataset:
        """With tiling: train and validation serve tiles (the heads are fitted on tile scores);
        test serves whole images at native size, one per batch, scored tile by tile."""
        if self.tile_size is None:
            return super().make_dataset(samples, split)
        if split == "test":
            return AnomalyDataset(samples, None)
        return TileDataset(samples, self.tile_size, self.tile_overlap, self.image_size)

    def test_dataloader(self) -> DataLoader:
        if self.tile_size is None:
            return super().test_dataloader()
        return self._loader(self.test_dataset, 1, shuffle=False)  # native sizes differ between images


class TileDataset(Dataset):
    """Every tile of every image as one normal training item (same keys as `AnomalyDataset`)."""

    def __init__(self, samples: list[Sample], tile_size: int, tile_overlap: int, image_size: int) -> None:
        self.samples = samples
        self.image_size = image_size
        self.tiles: list[tuple[Sample, Box]] = [
            (sample, box) for sample in samples for box in self._boxes(sample, tile_size, tile_overlap)
        ]
        self._cached: tuple[Path, Tensor] | None = None  # last image read: consecutive tiles share it

    @staticmethod
    def _boxes(sample: Sample, tile_size: int, tile_overlap: int) -> list[Box]:
        width, height = probe_image(sample.image_path, decode=False)
        try:
            return tile_boxes(height, width, tile_size, tile_overlap)
        except ValueError as err:
            raise BadInputError(f"cannot tile {sample.image_path}: {err} (--data.tile_size)") from err

    def _image(self, path: Path) -> Tensor:
        if self._cached is None or self._cached[0] != path:
            self._cached = (path, read_image(path, None))  # [3, H, W] at native size
        return self._cached[1]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> dict:
        sample, box = self.tiles[i]
        tile = extract_tiles(self._image(sample.image_path), [box])  # [1, 3, tile, tile]
        size = (self.image_size, self.image_size)
        image = F.interpolate(tile, size=size, mode="bilinear", antialias=True, align_corners=False)[0]  # [3, S, S]
        return {
            "image": image.clamp(0, 1),  # bilinear weights sum to 1; clamp only float rounding
            "mask": image.new_zeros(1, *size),  # [1, S, S]: training tiles are normal
            "label": torch.tensor(0, dtype=torch.int64),
            "path": str(sample.image_path),
            "category": sample.category,
            "defect": sample.defect,
        }
