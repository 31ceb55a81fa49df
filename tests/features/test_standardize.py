"""FeatureStandardizer: per-channel statistics of the normal training features, and nothing else."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ad_lightning.data import MVTecAD
from ad_lightning.features.standardize import FeatureStandardizer
from ad_lightning.lit import FeatureDDPM


def features(seed: int = 0) -> torch.Tensor:
    """[6, 3, 4, 5] features whose channels have different means and spreads."""
    generator = torch.Generator().manual_seed(seed)
    spread, centre = torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1), torch.tensor([0.0, -3.0, 10.0]).view(1, 3, 1, 1)
    return torch.randn(6, 3, 4, 5, generator=generator) * spread + centre


def test_statistics_are_numpys_over_images_and_positions():
    f = features()
    norm = FeatureStandardizer(3)
    norm.fit(f)
    values = f.numpy().astype(np.float64)
    np.testing.assert_allclose(norm.mean.numpy(), values.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(norm.std.numpy(), values.std(axis=(0, 2, 3), ddof=1), rtol=1e-6)
    z = norm(f).numpy().astype(np.float64)  # standardised training features: each channel mean 0, std 1
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3), ddof=1), 1.0, rtol=1e-5)


def test_other_features_are_standardised_with_the_training_statistics():
    train, other = features(0), features(1)
    norm = FeatureStandardizer(3)
    norm.fit(train)
    values = train.numpy().astype(np.float64)
    mean, std = values.mean(axis=(0, 2, 3)), values.std(axis=(0, 2, 3), ddof=1)
    want = (other.numpy() - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(norm(other).numpy(), want, rtol=1e-5, atol=1e-5)


def test_none_passes_features_through_unchanged_even_after_fit():
    f = features()
    norm = FeatureStandardizer(3, "none")
    norm.fit(f)
    assert torch.equal(norm(f), f)


def test_channel_mode_refuses_to_standardise_before_fit():
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureStandardizer(3)(features())
    with pytest.raises(ValueError, match="feature_norm"):
        FeatureStandardizer(3, "pixel")


def stats(model: FeatureDDPM, images: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (numpy, float64) of the raw backbone features of `images`, computed here."""
    with torch.no_grad():
        f = model.backbone(torch.stack(images)).numpy().astype(np.float64)  # [N, C, h, w]
    return f.mean(axis=(0, 2, 3)), f.std(axis=(0, 2, 3), ddof=1)


def test_fit_uses_the_training_split_only(tmp_path, make_mvtec_tree):
    """`fit`'s setup standardises with the statistics of the training split's features: not the validation
    split's, not the test split's, not all normal images'."""
    root = make_mvtec_tree(tmp_path, n_train=12, n_test_good=3)
    data = MVTecAD(root, "widget", image_size=64, val_fraction=0.25)
    model = FeatureDDPM(pretrained=False, heads="likelihood")
    model.eval()
    model.trainer = SimpleNamespace(datamodule=data, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    model.setup("fit")
    split = {name: [item["image"] for item in dataset] for name, dataset in
             (("train", data.train_dataset), ("val", data.val_dataset), ("test", data.test_dataset))}  # fmt: skip
    assert [len(images) for images in split.values()] == [9, 3, 7]
    fitted = model.feature_norm.mean.numpy(), model.feature_norm.std.numpy()
    train = stats(model, split["train"])
    for got, want in zip(fitted, train):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    for other in (split["val"], split["test"], split["train"] + split["val"]):
        mean, std = stats(model, other)
        assert not np.allclose(fitted[0], mean, rtol=1e-3, atol=1e-5) and not np.allclose(fitted[1], std, rtol=1e-3)
