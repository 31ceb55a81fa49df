"""Model options that change scoring, each checked through FeatureDDPM against a value computed another way:
`threshold_method: otsu`, `blur_sigma`, and the resizing of tiled maps, masks and decisions in `test_step`."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.filters import threshold_otsu

from ad_lightning.data import MVTecAD
from ad_lightning.evaluation.report import TestRecorder
from ad_lightning.heads import HeadOutput, Scores
from ad_lightning.lit import FeatureDDPM


def perturbed(model: FeatureDDPM) -> FeatureDDPM:
    """The model with a non-trivial EMA denoiser (its zero-initialised output would predict 0 everywhere)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.ema.module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return model.eval()


def test_otsu_thresholds_are_skimages_otsu_of_the_validation_scores(tmp_path, make_mvtec_tree):
    root = make_mvtec_tree(tmp_path, n_train=24, n_test_good=1, defects={"scratch": 1})
    data = MVTecAD(root, "widget", image_size=64, val_fraction=0.5)  # 12 validation images
    heads = ["likelihood", "patchcore", "iforest"]
    torch.manual_seed(0)
    model = perturbed(FeatureDDPM(pretrained=False, heads=heads, threshold_method="otsu"))
    model.feature_norm.fit(data.cache_features(model.backbone))  # as `fit` does before training
    model.fit_heads(data)
    images = torch.stack([item["image"] for item in data.val_dataset])  # [12, 3, 64, 64]
    scores = model.score_batch(images)  # the validation images scored as test images are
    for head in heads:
        normal = scores[head].score.double().numpy()
        threshold = float(model.heads[head].threshold)
        assert threshold == pytest.approx(float(threshold_otsu(normal)), rel=1e-4, abs=1e-6), head
        assert threshold != pytest.approx(float(np.percentile(normal, 99)), rel=1e-3), head  # the option took effect


@pytest.fixture(scope="module")
def scoring_model() -> FeatureDDPM:
    """A model with every piece `score_batch` needs fitted by hand: feature statistics, the likelihood
    normalisers, a PatchCore memory bank of random training features."""
    torch.manual_seed(0)
    model = perturbed(FeatureDDPM(pretrained=False, heads=["likelihood", "patchcore"]))
    channels = model.backbone.out_channels
    model.feature_norm.fit(torch.randn(4, channels, 4, 4))
    model.heads["likelihood"].fit(HeadOutput({"nll": torch.tensor([0.0, 1.0]), "sp": torch.tensor([0.0, 1.0])}, None))
    model.heads["patchcore"].fit_train(iter([torch.randn(4, channels, 4, 4)]), model.eps_fn, model.alpha_bar)
    return model


def scipy_blur(maps: torch.Tensor, sigma: float) -> np.ndarray:
    """scipy's Gaussian filter of each map [B, H, W]: kernel radius 4 sigma, borders mirrored without repeating
    the edge pixel (torchvision's `reflect`)."""
    return np.stack([gaussian_filter(m.double().numpy(), sigma, mode="mirror", truncate=4.0) for m in maps])


def test_blur_sigma_blurs_the_upsampled_maps_of_heads_without_their_own(scoring_model):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model, patchcore = scoring_model, scoring_model.heads["patchcore"]
    try:
        plain = model.score_batch(images)
        model.hparams.blur_sigma = 2.0
        blurred = model.score_batch(images)
        patchcore.blur_sigma = 0.0  # its own setting (4 by default) switched off
        patchcore_plain = model.score_batch(images, heads=["patchcore"])["patchcore"]
    finally:
        model.hparams.blur_sigma, patchcore.blur_sigma = 0.0, 4.0
    likelihood = blurred["likelihood"].maps
    assert not torch.allclose(likelihood, plain["likelihood"].maps)
    np.testing.assert_allclose(likelihood.numpy(), scipy_blur(plain["likelihood"].maps, 2.0), rtol=1e-4, atol=1e-5)
    assert torch.equal(blurred["likelihood"].score, plain["likelihood"].score)  # scores come from unblurred maps
    # patchcore blurs with its own sigma 4 whatever the model's setting
    assert torch.equal(blurred["patchcore"].maps, plain["patchcore"].maps)
    own_blur = scipy_blur(patchcore_plain.maps, 4.0)
    np.testing.assert_allclose(plain["patchcore"].maps.numpy(), own_blur, rtol=1e-4, atol=1e-5)


def test_tiled_maps_masks_and_decisions_are_resized_to_the_evaluation_resolution():
    """A 96 x 96 test image scored at native size (as tiles are stitched) is recorded at image_size 64:
    the map bilinearly (a linear map stays linear: the value at output pixel (i, j) is the input's at
    (1.5 i + 0.25, 1.5 j + 0.25)), the mask and the pixel decisions by nearest neighbour."""
    model = FeatureDDPM(pretrained=False, heads="likelihood")
    rows, cols = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    native_map = cols + 100 * rows  # [96, 96]
    quarter = torch.zeros(96, 96, dtype=torch.bool)
    quarter[48:, :48] = True  # the bottom-left quarter
    scores = Scores(torch.tensor([1.0]), {}, native_map[None], pixel_decisions=quarter[None])
    model.score_images = lambda image, timer: {"ramp": scores}  # what scoring the native image tile by tile gave
    model._recorder = TestRecorder({"ramp": 0}, {"ramp": 0.5}, pixel_mode="exact")
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(image_size=64, tiling=(48, 0)))
    batch = {"image": torch.zeros(1, 3, 96, 96), "mask": quarter[None, None].float(), "label": torch.tensor([1]),
             "path": ["part.png"], "category": ["part"]}  # fmt: skip
    model.test_step(batch, 0)

    recorder = model._recorder
    (recorded_map,), (recorded_mask,) = recorder.maps["ramp"], recorder.masks
    i, j = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    torch.testing.assert_close(recorded_map[0], (1.5 * j + 0.25) + 100 * (1.5 * i + 0.25))
    expected_mask = torch.zeros(64, 64, dtype=torch.bool)
    expected_mask[32:, :32] = True
    assert torch.equal(recorded_mask[0], expected_mask)
    tp, fp, fn, tn = recorder.decisions[("ramp", "part")]
    assert (tp, fp, fn, tn) == (32 * 32, 0, 0, 64 * 64 - 32 * 32)  # decisions resized onto the mask exactly
