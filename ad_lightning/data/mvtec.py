"""MVTec-AD (Bergmann et al., CVPR 2019) and any dataset saved in its directory layout.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/{good,<defect>}/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from pathlib import Path
from typing import Any

from ad_lightning.data.base import NORMAL_DEFECT, AnomalyDataModule, Sample
from ad_lightning.data.images import BadInputError, list_images


class MVTecAD(AnomalyDataModule):
    """MVTec-AD: 15 categories, normal-only training, pixel masks for every defective test image."""

    CATEGORIES = (
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
        "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
    )  # fmt: skip
    DATA_HINT = (
        "download MVTec-AD from https://www.mvtec.com/company/research/datasets/mvtec-ad and extract it "
        "so that <root>/<category>/train/good exists"
    )

    def __init__(self, root: str | Path, category: str | list[str] = "bottle", **kwargs: Any) -> None:
        super().__init__(root, category, **kwargs)

    def make_samples(self, category: str) -> tuple[list[Sample], list[Sample]]:
        category_dir = self.root / category
        train_good = [
            Sample(path, 0, None, category, NORMAL_DEFECT)
            for path in self.require_images(category_dir / "train" / NORMAL_DEFECT)
        ]
        test = [
            sample
            for defect_dir in self._defect_dirs(category_dir / "test")
            for sample in self._test_samples(category_dir, defect_dir)
        ]
        if not test:
            raise BadInputError(f"no test images under {category_dir / 'test'}; {self.DATA_HINT}")
        return train_good, test

    def _defect_dirs(self, test_dir: Path) -> list[Path]:
        """Sub-directories of `test_dir` ("good" and one per defect type), sorted."""
        return sorted(p for p in self.require_dir(test_dir).iterdir() if p.is_dir() and not p.name.startswith("."))

    def _test_samples(self, category_dir: Path, defect_dir: Path) -> list[Sample]:
        """Test samples of one defect directory; masks are paired by file stem, never by position."""
        defect = defect_dir.name
        if defect == NORMAL_DEFECT:
            return [Sample(path, 0, None, category_dir.name, defect) for path in list_images(defect_dir)]
        mask_dir = category_dir / "ground_truth" / defect
        return [
            Sample(path, 1, mask_dir / f"{path.stem}_mask.png", category_dir.name, defect)
            for path in list_images(defect_dir)
        ]
