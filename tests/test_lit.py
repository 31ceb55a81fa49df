"""FeatureDDPM pieces that the CLI smoke tests do not pin: EMA ramp, loss, schedule, scoring path."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ad_lightning.data import Printed3D
from ad_lightning.data.tiling import extract_tiles, tile_boxes
from ad_lightning.errors import UsageError
from ad_lightning.heads import Head, HeadOutput
from ad_lightning.lit import FeatureDDPM, ema_with_warmup, parse_names


@pytest.fixture(scope="module")
def model():
    return FeatureDDPM(pretrained=False)


def test_ema_ramp_follows_formula():
    update = ema_with_warmup(0.999)
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    update(avg, cur, torch.tensor(1))  # decay min(0.999, 2/11)
    assert torch.allclose(avg[0], torch.full((3,), 1 - 2 / 11))
    update(avg, cur, torch.tensor(10**6))  # late: the nominal decay
    assert torch.allclose(avg[0], torch.full((3,), 1 - (2 / 11) * 0.999), atol=1e-6)


def test_untrained_loss_is_the_noise_variance(model):
    """The zero-initialised denoiser predicts 0, so the loss is E||eps||^2 = 1."""
    z0 = torch.randn(16, model.backbone.out_channels, 8, 8)
    loss = model.diffusion_loss(z0, torch.Generator().manual_seed(0))
    assert float(loss.detach()) == pytest.approx(1.0, abs=0.02)


def test_lr_warms_up_then_decays_by_cosine(model):
    model.trainer = SimpleNamespace(estimated_stepping_batches=1000)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = model.hparams.lr
    assert lrs[0] < 0.01 * peak and lrs[50] < lrs[99]
    assert max(lrs) == pytest.approx(peak, rel=1e-3) and int(torch.tensor(lrs).argmax()) == 100
    assert lrs[-1] == pytest.approx(peak * model.hparams.min_lr_ratio, rel=0.05)
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))


def test_eps_fn_uses_the_ema_copy(model):
    x, t = torch.randn(2, model.backbone.out_channels, 8, 8), torch.tensor([3, 500])
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.01)
    assert torch.equal(model.eps_fn(x, t), model.ema.module(x, t))
    assert not torch.equal(model.eps_fn(x, t), model.denoiser(x, t))


def test_head_names_parse():
    assert parse_names("likelihood, irf") == ["likelihood", "irf"]
    assert parse_names(["likelihood"]) == ["likelihood"]


def test_a_large_image_scored_with_tiles_gives_a_full_resolution_map(model):
    model.feature_norm.fit(torch.randn(4, model.backbone.out_channels, 4, 4))
    model.heads["likelihood"].fit(HeadOutput({"nll": torch.tensor([0.0, 1.0]), "sp": torch.tensor([0.0, 1.0])}, None))
    with torch.no_grad():  # a non-trivial network, so tiles score differently
        for p in model.ema.module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    image = torch.rand(3, 1024, 1024)
    scores = model.score_tiled(image, tile=256, overlap=32, size=64)["likelihood"]
    assert scores.maps.shape == (1, 1024, 1024) and torch.isfinite(scores.maps).all()
    boxes = tile_boxes(1024, 1024, 256, 32)
    tiles = F.interpolate(extract_tiles(image, boxes), size=(64, 64), mode="bilinear", antialias=True)
    per_tile = model.score_batch(tiles.clamp(0, 1))["likelihood"]
    assert per_tile.score.std() > 0  # tiles score differently, so the map check below can tell them apart
    # the top-left corner is covered by the first tile only: the stitched map is that tile's map there
    first = F.interpolate(per_tile.maps[:1, None], size=(256, 256), mode="bilinear")[0, 0]
    torch.testing.assert_close(scores.maps[0, :200, :200], first[:200, :200])


def test_a_tiled_image_scores_as_its_most_anomalous_tile_with_each_tile_map_in_place(model):
    """Four 64-pixel tiles scored at their own size, no overlap: three copies of tile a, and tile b at the
    bottom left. The image score is the larger of a's and b's scores alone, and each quarter of the map is
    its own tile's map (b's at the bottom left)."""
    model.feature_norm.fit(torch.randn(4, model.backbone.out_channels, 4, 4))
    model.heads["likelihood"].fit(HeadOutput({"nll": torch.tensor([0.0, 1.0]), "sp": torch.tensor([0.0, 1.0])}, None))
    with torch.no_grad():
        for p in model.ema.module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    a, b = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    b[:, 20:40, 10:30] = 1.0  # a saturated patch
    image = torch.cat([torch.cat([a, a], dim=2), torch.cat([b, a], dim=2)], dim=1)  # [3, 128, 128]: rows (a a), (b a)
    alone = model.score_batch(torch.stack([a, b]))["likelihood"]
    assert not torch.allclose(alone.score[0], alone.score[1]) and not torch.allclose(alone.maps[0], alone.maps[1])
    tiled = model.score_tiled(image, tile=64, overlap=0, size=64)["likelihood"]
    torch.testing.assert_close(tiled.score, alone.score.max()[None], rtol=1e-5, atol=1e-5)
    for (row, col), which in {(0, 0): 0, (0, 1): 0, (1, 0): 1, (1, 1): 0}.items():
        quarter = tiled.maps[0, 64 * row : 64 * (row + 1), 64 * col : 64 * (col + 1)]
        torch.testing.assert_close(quarter, alone.maps[which], rtol=1e-5, atol=1e-5)


def test_tiled_validation_calibrates_the_threshold_on_each_image_s_maximum_tile():
    """Deployed on an image, a score is the max over its tiles: calibrating per tile would flag about
    1 - 0.99^16 = 15 % of normal images at 16 tiles; per image it flags about 1 %."""
    head = Head()
    generator = torch.Generator().manual_seed(0)
    tiles, images = 16, 2000
    index = torch.arange(images).repeat_interleave(tiles)
    validation = HeadOutput({}, None, score=torch.randn(images * tiles, generator=generator))
    new_images = torch.randn(images, tiles, generator=generator).amax(1)  # fresh normal images, max over tiles
    head.calibrate(validation, "percentile", 99.0)
    per_tile = float((new_images >= float(head.threshold)).float().mean())
    head.calibrate(validation, "percentile", 99.0, images=index)
    per_image = float((new_images >= float(head.threshold)).float().mean())
    assert per_tile == pytest.approx(1 - 0.99**tiles, abs=0.03) and per_image == pytest.approx(0.01, abs=0.006)
    maxima = validation.score.view(images, tiles).amax(1)
    assert float(head.threshold) == pytest.approx(float(np.percentile(maxima.numpy(), 99.0)))


def test_printed3d_names_the_image_of_every_validation_tile(tmp_path, write_image_file):
    part = tmp_path / "prints" / "gear"
    for i in range(6):
        write_image_file(part / "train/good" / f"{i}.png", seed=i, size=80)
    write_image_file(part / "test/good/0.png", seed=50, size=80)
    data = Printed3D(tmp_path / "prints", "gear", image_size=32, tile_size=48, tile_overlap=8, val_fraction=0.34)
    data.setup()
    assert data.val_images().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # 2 images of 4 tiles each
    assert Printed3D(tmp_path / "prints", "gear", image_size=32).val_images() is None


class Echo(torch.nn.Module):
    """A denoiser that predicts the state itself: at the last timestep, where the state is almost pure
    noise, the prediction of one that has learned."""

    def forward(self, x, t):
        return x


def test_heads_fitted_on_a_denoiser_that_learned_nothing_warn_with_the_fix():
    untrained = FeatureDDPM(pretrained=False)  # zero-initialised output: predicts eps = 0
    untrained._head_features = torch.randn(4, untrained.backbone.out_channels, 8, 8)
    untrained.feature_norm.fit(untrained._head_features)
    with pytest.warns(UserWarning, match=r"has not learned to predict noise.*correlates 0\.000.*--model\.lr 0\.001"):
        untrained._warn_if_not_learned()
    untrained.ema.module = Echo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        untrained._warn_if_not_learned()


@pytest.mark.parametrize("denoiser, lr", [("tiny", 1e-3), ("small", 3e-4)])
def test_the_peak_learning_rate_defaults_to_the_denoiser_size_s_and_a_given_one_wins(denoiser, lr):
    assert FeatureDDPM(pretrained=False, denoiser=denoiser).hparams.lr == lr
    assert FeatureDDPM(pretrained=False, denoiser=denoiser, lr=5e-4).hparams.lr == 5e-4


def test_an_unknown_threshold_method_is_refused_before_anything_is_trained():
    with pytest.raises(UsageError, match="--model.threshold_method 'median' is not one of percentile, gaussian, otsu"):
        FeatureDDPM(pretrained=False, threshold_method="median")
