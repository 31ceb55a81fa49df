"""Nothing is fitted on the test split: `test` of one checkpoint on two test splits that differ only in their
anomalous images leaves every fitted quantity as the checkpoint stored it and scores every unchanged image
identically. The same check run on a deliberately leaking `test_step` reports differences, so it can fail.
"""

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import build_easy_tree, run_test
from torch import Tensor

from ad_lightning.checkpoint import load_checkpoint
from ad_lightning.lit import FeatureDDPM

pytestmark = pytest.mark.usefixtures("raw_errors")

FITTED = ("heads.", "feature_norm.")  # state-dict prefixes of what is fitted: head states, feature statistics


@dataclass
class Run:
    """What one `test` leaves behind that must not depend on the test split."""

    state: dict[str, Tensor]  # the fitted entries of the model's state dict after the run
    thresholds: dict[str, float | None]  # metrics.json's deployed image thresholds
    scores: dict[str, dict[str, float]]  # image path relative to the data root -> score column -> value


def fitted(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value for key, value in state.items() if key.startswith(FITTED)}


def read_run(model: FeatureDDPM, run: Path, root: Path) -> Run:
    metrics = json.loads((run / "metrics.json").read_text())
    with (run / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    scores = {str(Path(r.pop("path")).relative_to(root)): {k: float(v) for k, v in r.items()} for r in rows}
    return Run(fitted(model.state_dict()), metrics["thresholds"]["deployed_image_threshold"], scores)


def same(a: Tensor, b: Tensor) -> bool:
    """Bit-equal tensors (NaN equal to NaN: an uncalibrated map range stays NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))


def state_differences(a: dict[str, Tensor], b: dict[str, Tensor]) -> list[str]:
    keys = a.keys() | b.keys()
    return sorted(f"state {key}" for key in keys if key not in a or key not in b or not same(a[key], b[key]))


def differences(a: Run, b: Run, unchanged: set[str]) -> list[str]:
    """Everything fitted that differs between two runs, and every score of an `unchanged` image that does."""
    found = state_differences(a.state, b.state)
    for head in a.thresholds.keys() | b.thresholds.keys():
        x, y = a.thresholds.get(head), b.thresholds.get(head)
        if not (x == y or (x is not None and y is not None and math.isnan(x) and math.isnan(y))):
            found.append(f"threshold {head}: {x} != {y}")
    for path in sorted(unchanged):
        found += [f"score {path} {c}" for c, v in a.scores[path].items() if b.scores[path].get(c) != v]
    return found


@pytest.fixture(scope="module")
def other_root(easy_model) -> Path:
    """The easy set again with other anomalous test images: same normal images, new squares elsewhere."""
    return build_easy_tree(easy_model.base / "other_anomalies", defect_seed=1)


def unchanged_images(root: Path, other: Path) -> set[str]:
    """Test images (relative paths) with the same bytes under both roots; the anomalous ones must all differ."""
    paths = [p.relative_to(root) for p in (root / "easy" / "test").rglob("*.png")]
    kept = {str(p) for p in paths if (root / p).read_bytes() == (other / p).read_bytes()}
    assert kept == {str(p) for p in paths if p.parent.name == "good"} and len(kept) == 8
    return kept


def run_twice(easy_model, other_root: Path, tmp_path: Path, *extra: str) -> tuple[Run, Run]:
    runs = []
    for name, root in (("first", easy_model.root), ("second", other_root)):
        model, run = run_test(easy_model.ckpt, root, tmp_path / name, *extra)
        runs.append(read_run(model, run, root))
    return runs[0], runs[1]


def test_test_fits_nothing_on_the_test_split(easy_model, other_root, tmp_path):
    first, second = run_twice(easy_model, other_root, tmp_path)
    stored = fitted(load_checkpoint(easy_model.ckpt)["state_dict"])
    assert len(stored) > 50 and stored.keys() == first.state.keys()  # every head's state is compared
    assert state_differences(stored, first.state) == []  # as the checkpoint stored it
    assert differences(first, second, unchanged_images(easy_model.root, other_root)) == []
    changed = [p for p in first.scores if p.startswith("easy/test/square")]
    assert any(first.scores[p]["likelihood"] != second.scores[p]["likelihood"] for p in changed)  # new anomalies


def leaky_test_step(honest):
    """A test_step that refits the likelihood head's normalisers, map range and threshold on each test batch
    before scoring it: a label-free leak of the kind InvAD's official code had (min-max over the test set)."""

    def test_step(self, batch, batch_idx):
        head = self.heads["likelihood"]
        with torch.no_grad():
            head.calibrate(head.evaluate(self.encode(batch["image"]), self.eps_fn, self.alpha_bar).to("cpu"))
        return honest(self, batch, batch_idx)

    return test_step


def test_the_check_finds_a_leak(easy_model, other_root, tmp_path, monkeypatch):
    monkeypatch.setattr(FeatureDDPM, "test_step", leaky_test_step(FeatureDDPM.test_step))
    first, second = run_twice(easy_model, other_root, tmp_path, "--model.heads", "likelihood")
    found = differences(first, second, unchanged_images(easy_model.root, other_root))
    for key in ("loc", "scale"):
        assert f"state heads.likelihood.norms.nll.{key}" in found
    assert "state heads.likelihood.threshold" in found and "state heads.likelihood.map_high" in found
    assert any(item.startswith("score easy/test/good/") for item in found)  # normal images score differently
    stored = fitted(load_checkpoint(easy_model.ckpt)["state_dict"])
    stored = {key: value for key, value in stored.items() if key in first.state}  # the likelihood head's
    assert "state heads.likelihood.threshold" in state_differences(stored, first.state)
