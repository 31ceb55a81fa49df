"""MPDD, the Metal Parts Defect Detection dataset (Jezek et al., ICUMT 2021), in the MVTec-AD layout."""

from pathlib import Path
from typing import Any

from ad_lightning.data.mvtec import MVTecAD


class MPDD(MVTecAD):
    """MPDD: 6 metal-part categories, 1024 x 1024 PNGs, stored exactly like MVTec-AD."""

    CATEGORIES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
    DATA_HINT = (
        "MPDD has no public automatic download: get it from https://github.com/stepanje/MPDD and extract it "
        "so that <root>/<category>/train/good exists"
    )

    def __init__(self, root: str | Path, category: str | list[str] = "bracket_black", **kwargs: Any) -> None:
        super().__init__(root, category, **kwargs)
