"""VisA, the Visual Anomaly dataset (Zou et al., ECCV 2022), read in place from its raw archive layout.

    <root>/split_csv/1cls.csv                      object,split,label,image,mask (paths relative to root)
    <root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<category>/Data/Masks/Anomaly/*.png     defect-class ids (0 background), not 0/255

Nothing is copied or converted: the masks' class ids are binarised when read (any non-zero is
anomalous), and the CSV's `train` rows are the normal training images, its `test` rows the test set.
"""

import csv
from pathlib import Path
from typing import Any

from ad_lightning.data.base import NORMAL_DEFECT, AnomalyDataModule, Sample
from ad_lightning.data.images import BadInputError

SPLIT_CSV = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
ANOMALY_DEFECT = "anomaly"  # the 1cls split does not name defect types


class VisA(AnomalyDataModule):
    """VisA: 12 categories of high-resolution JPGs with the official one-class split (`1cls.csv`)."""

    CATEGORIES = (
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1",
        "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    )  # fmt: skip
    DATA_HINT = (
        "download VisA_20220922.tar (see https://github.com/amazon-science/spot-diff) and extract it "
        "so that <root>/split_csv/1cls.csv and <root>/<category>/Data exist"
    )

    def __init__(self, root: str | Path, category: str | list[str] = "candle", **kwargs: Any) -> None:
        super().__init__(root, category, **kwargs)

    def make_samples(self, category: str) -> tuple[list[Sample], list[Sample]]:
        splits: dict[str, list[Sample]] = {"train": [], "test": []}
        for row_name, row in self._rows():
            if row["object"] == category:
                split = row["split"]
                if split not in splits:
                    raise BadInputError(f"{row_name} has split {split!r}; expected 'train' or 'test'")
                splits[split].append(self._sample(row_name, row))
        if not splits["test"]:
            raise BadInputError(f"no test rows for category {category!r} in {self.root / SPLIT_CSV}; {self.DATA_HINT}")
        return splits["train"], splits["test"]

    def _rows(self) -> list[tuple[str, dict[str, str]]]:
        """(name for errors, row) of every row of the split CSV, after checking its header."""
        csv_path = self.root / SPLIT_CSV
        if not csv_path.is_file():
            raise FileNotFoundError(f"VisA split file {csv_path} does not exist; {self.DATA_HINT}")
        with csv_path.open(newline="") as file:
            reader = csv.DictReader(file)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                header = ",".join(CSV_COLUMNS)
                raise BadInputError(f"{csv_path} lacks the column(s) {missing}; expected the header {header}")
            return [(f"row {reader.line_num} of {csv_path}", row) for row in reader]

    def _sample(self, row_name: str, row: dict[str, str]) -> Sample:
        """The sample of one CSV row: normal rows have no mask, anomalous rows must name one."""
        label = LABELS.get(row["label"])
        if label is None:
            raise BadInputError(f"{row_name} has label {row['label']!r}; expected one of {sorted(LABELS)}")
        image = self._inside_root(row_name, row["image"])
        if label == 0:
            return Sample(image, 0, None, row["object"], NORMAL_DEFECT)
        if not row["mask"]:
            raise BadInputError(f"{row_name} is an anomaly without a mask path; add the mask column")
        return Sample(image, 1, self._inside_root(row_name, row["mask"]), row["object"], ANOMALY_DEFECT)

    def _inside_root(self, row_name: str, relative: str) -> Path:
        """`root / relative`, refusing paths that leave root (`../x`, absolute paths, links out)."""
        path = self.root / relative
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise BadInputError(
                f"{row_name} names {relative!r}, which resolves outside the data root {root}; "
                "VisA paths must be relative to the root"
            )
        return path
