"""ad_lightning: reconstruction-free diffusion anomaly detection in the feature space of a frozen CNN.

`python -m ad_lightning` is the command line; `Detector` the Python API (see `ad_lightning.api`).
"""

from ad_lightning.api import Detector, Result

__all__ = ["Detector", "Result"]
