"""DataModules, chosen on the command line by short name (`--data MVTecAD`, `--data Demo`)."""

from ad_lightning.data.base import AnomalyDataModule, AnomalyDataset, Sample
from ad_lightning.data.btad import BTAD
from ad_lightning.data.demo import Demo
from ad_lightning.data.folder import Folder
from ad_lightning.data.images import BadFileError, BadInputError
from ad_lightning.data.mpdd import MPDD
from ad_lightning.data.mvtec import MVTecAD
from ad_lightning.data.photos import Photos
from ad_lightning.data.printed3d import Printed3D
from ad_lightning.data.visa import VisA

__all__ = [
    "BTAD",
    "MPDD",
    "AnomalyDataModule",
    "AnomalyDataset",
    "BadFileError",
    "BadInputError",
    "Demo",
    "Folder",
    "MVTecAD",
    "Photos",
    "Printed3D",
    "Sample",
    "VisA",
]
