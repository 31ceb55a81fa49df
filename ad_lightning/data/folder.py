"""Any data set given as plain directories: normal images, anomalous images, optional masks.

    <normal_dir>/*          normal images (training, validation and, without normal_test_dir, a test share)
    <abnormal_dir>/*        anomalous test images
    <mask_dir>/<stem>.png or <stem>_mask.png    optional masks of the anomalous images
    <normal_test_dir>/*     optional normal test images

Directories are taken relative to `root` (absolute ones as they are).
"""

from pathlib import Path
from typing import Any

from ad_lightning.data.base import NORMAL_DEFECT, AnomalyDataModule, Sample, split_normal
from ad_lightning.data.images import BadInputError, find_mask


class Folder(AnomalyDataModule):
    """One pseudo-category `name` built from directories; image-level only unless `mask_dir` is given."""

    CATEGORY_DIRS = False
    DATA_HINT = "check --data.normal_dir, --data.abnormal_dir, --data.mask_dir and --data.normal_test_dir"

    def __init__(
        self,
        normal_dir: str | Path,
        abnormal_dir: str | Path,
        mask_dir: str | Path | None = None,
        normal_test_dir: str | Path | None = None,
        root: str | Path = ".",
        name: str = "folder",
        normal_test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, name, **kwargs)
        if not 0.0 < normal_test_fraction < 1.0:
            raise BadInputError(
                f"normal_test_fraction={normal_test_fraction} must be in (0, 1); set --data.normal_test_fraction"
            )
        self.name = name
        self.normal_dir = self.root / normal_dir
        self.abnormal_dir = self.root / abnormal_dir
        self.mask_dir = None if mask_dir is None else self.root / mask_dir
        self.normal_test_dir = None if normal_test_dir is None else self.root / normal_test_dir
        self.normal_test_fraction = normal_test_fraction

    @property
    def categories(self) -> list[str]:
        return [self.name]

    @property
    def has_masks(self) -> bool:
        return self.mask_dir is not None

    def make_samples(self, category: str) -> tuple[list[Sample], list[Sample]]:
        normal = self._samples(self.normal_dir, 0, NORMAL_DEFECT)
        if self.normal_test_dir is None:  # hold out a seeded share of normal_dir for testing
            normal, test_normal = split_normal(
                normal, category, self.normal_test_fraction, self.seed, option="normal_test_fraction"
            )
        else:
            test_normal = self._samples(self.normal_test_dir, 0, NORMAL_DEFECT)
        return normal, test_normal + self._samples(self.abnormal_dir, 1, self.abnormal_dir.name)

    def _samples(self, directory: Path, label: int, defect: str) -> list[Sample]:
        """Samples of every image in `directory`; anomalous ones get their mask by stem when there is a mask_dir."""
        return [
            Sample(path, label, self._mask_path(path) if label else None, self.name, defect)
            for path in self.require_images(directory)
        ]

    def _mask_path(self, image: Path) -> Path | None:
        if self.mask_dir is None:
            return None
        return find_mask(self.require_dir(self.mask_dir), [f"{image.stem}.png", f"{image.stem}_mask.png"])
