"""BTAD, the BeanTech Anomaly Detection dataset (Mishra et al., ISIE 2021).

    <root>/<product>/train/ok/*.{bmp,png}
    <root>/<product>/test/{ok,ko}/*.{bmp,png}
    <root>/<product>/ground_truth/ko/<stem>.{png,bmp}
"""

from pathlib import Path
from typing import Any

from ad_lightning.data.base import NORMAL_DEFECT, AnomalyDataModule, Sample
from ad_lightning.data.images import find_mask

NORMAL_DIR, ANOMALY_DIR = "ok", "ko"
MASK_SUFFIXES = (".png", ".bmp")  # product 03 ships BMP, the others PNG


class BTAD(AnomalyDataModule):
    """BTAD: 3 industrial products, normal-only training, a pixel mask (same stem) per defective test image."""

    CATEGORIES = ("01", "02", "03")
    DATA_HINT = (
        "download btad.zip from https://avires.dimi.uniud.it/papers/btad/btad.zip and extract it "
        "so that <root>/01/train/ok exists"
    )

    def __init__(self, root: str | Path, category: str | list[str] = "01", **kwargs: Any) -> None:
        super().__init__(root, category, **kwargs)

    def make_samples(self, category: str) -> tuple[list[Sample], list[Sample]]:
        product_dir = self.root / category
        train_good = [
            Sample(path, 0, None, category, NORMAL_DEFECT)
            for path in self.require_images(product_dir / "train" / NORMAL_DIR)
        ]
        test_normal = [
            Sample(path, 0, None, category, NORMAL_DEFECT)
            for path in self.require_images(product_dir / "test" / NORMAL_DIR)
        ]
        mask_dir = product_dir / "ground_truth" / ANOMALY_DIR
        test_anomalous = [
            Sample(path, 1, find_mask(mask_dir, [path.stem + s for s in MASK_SUFFIXES]), category, ANOMALY_DIR)
            for path in self.require_images(product_dir / "test" / ANOMALY_DIR)
        ]
        return train_good, test_normal + test_anomalous
