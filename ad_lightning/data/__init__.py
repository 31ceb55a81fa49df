"""DataModules, chosen on the command line by short name (`--data MVTecAD`, `--data Demo`)."""

from ad_lightning.data.base import AnomalyDataModule, AnomalyDataset, Sample
from ad_lightning.data.images import BadInputError
from ad_lightning.data.mvtec import Demo, MVTecAD

__all__ = ["AnomalyDataModule", "AnomalyDataset", "BadInputError", "Demo", "MVTecAD", "Sample"]
