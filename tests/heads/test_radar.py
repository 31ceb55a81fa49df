import math

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import RadarHead, build_head
from ad_lightning.heads.radar import attention_map, image_features, kl_rows, layer_grid
from ad_lightning.models.registry import build_denoiser

A = linear_alpha_bar(1000)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = build_denoiser("tiny", 8).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)  # the zero-initialised output layers would hide everything
    return model


def eps_fn_of(net):
    @torch.no_grad()
    def eps_fn(x, t, return_attention=False):
        return net(x, t, return_attention=return_attention)

    return eps_fn


def test_attention_capture_is_row_stochastic_with_the_documented_shape(net):
    z0 = torch.randn(3, 8, 16, 16)
    eps, attention = eps_fn_of(net)(z0, torch.zeros(3, dtype=torch.long), return_attention=True)
    assert eps.shape == z0.shape and len(attention) == len(net.attention_layers) == 4  # encoder 8x8, middle 4x4, decoder 2 x 8x8
    for a in attention:
        n = a.shape[-1]
        assert a.shape == (3, 4, n, n) and n in (64, 16)  # [B, heads, N, N] at 8x8 and 4x4
        assert torch.allclose(a.sum(-1), torch.ones(3, 4, n), atol=1e-5) and float(a.min()) >= 0
    # the same denoiser without the flag gives the same noise prediction (no second model)
    assert torch.allclose(net(z0, torch.zeros(3, dtype=torch.long)), eps, atol=1e-5)


def test_kl_rows_and_layer_grid_by_hand():
    uniform = torch.full((2, 2), 0.5)
    rows = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]])
    kl = kl_rows(rows, uniform)
    assert float(kl[0, 0]) == pytest.approx(0.0, abs=1e-6)
    assert float(kl[0, 1]) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), abs=1e-5)
    assert layer_grid(64, (16, 16)) == (8, 8, 2) and layer_grid(8, (8, 4)) == (4, 2, 2)
    # padded grids keep the positions covering the features: 14 -> 7 at f = 2, ceil(14 / 4) = 4 at f = 4
    assert layer_grid(49, (14, 14)) == (7, 7, 2) and layer_grid(16, (14, 14)) == (4, 4, 4)
    assert layer_grid(4 * 5, (14, 20)) == (4, 5, 4) and layer_grid(1, (14, 20)) == (1, 1, 32)
    with pytest.raises(ValueError, match="tile"):
        layer_grid(7, (16, 16))


def test_attention_map_of_a_padded_grid_has_the_feature_grid_shape(net):
    """14 x 14 features: the tiny denoiser pads to 16 x 16, returns attention over the 7 x 7 and 4 x 4
    positions that cover the features, and the map comes back 14 x 14."""
    z0 = torch.randn(3, 8, 14, 14)
    _, attention = eps_fn_of(net)(z0, torch.zeros(3, dtype=torch.long), return_attention=True)
    assert [a.shape[-1] for a in attention] == [49, 16, 49, 49]
    head = build_head("radar", map="attention")
    head.fit_train(iter([torch.randn(8, 8, 14, 14)]), eps_fn_of(net), A)
    m = head.evaluate(z0, eps_fn_of(net), A).map
    assert m.shape == (3, 14, 14) and torch.isfinite(m).all() and (m > 0).all()


def test_attention_map_puts_each_position_where_it_covers():
    """A layer at factor 4 over 14 x 14 features has 4 x 4 positions covering 16 x 16 (rows 0-3, 4-7,
    8-11, 12-15). A divergence in its last row of positions reaches, interpolated between position
    centres (rows 9.5 and 13.5), up to feature row 10 and no higher; stretching the 4 rows over the
    14 feature rows instead would move the centres and spill into row 9."""
    rows = torch.full((1, 16, 16), 1 / 16)
    rows[0, 12:] = torch.eye(16)[12:]  # the last row of positions attends to itself alone
    m = attention_map([rows], [torch.full((16, 16), 1 / 16)], (14, 14))
    assert m.shape == (1, 14, 14)
    assert m[0, :10].abs().max() < 1e-6 and m[0, 10:].min() > 0
    assert m[0, 10].mean() < m[0, 11].mean() < m[0, 12].mean() < m[0, 13].mean()


def test_image_features_are_global_l2_and_local_max():
    m = torch.zeros(1, 5, 5)
    m[0, 2, 2] = 9.0
    f = image_features(m)
    assert float(f[0, 0]) == pytest.approx(9.0) and float(f[0, 1]) == pytest.approx(1.0)  # 9 / 9 cells


@pytest.mark.parametrize("size", [(16, 16), (14, 14), (14, 20)])  # 14 is padded by the denoiser
@pytest.mark.parametrize("kind", ["attention", "noise"])
def test_fit_then_score_flags_a_corrupted_image(net, kind, size):
    torch.manual_seed(1)
    train = [torch.randn(16, 8, *size) * 0.5 for _ in range(2)]
    head = build_head("radar", map=kind, t_r=10)
    # the noise map needs a network whose ||eps|| follows the input: an identity stands in for a trained one
    eps_fn = eps_fn_of(net) if kind == "attention" else (lambda x, t: x)
    head.fit_train(iter(train), eps_fn, A)
    assert head.nfe == 1
    head.calibrate(head.evaluate(torch.randn(12, 8, *size) * 0.5, eps_fn, A))
    test = torch.randn(2, 8, *size) * 0.5
    test[1, :, 4:10, 4:10] = 6.0  # a large foreign patch
    score, m = head.score(head.evaluate(test, eps_fn, A))
    assert m.shape == (2, *size) and torch.isfinite(m).all() and score[1] > score[0]
    assert bool(score[1] >= head.threshold)


def test_pixel_decisions_are_otsu_inside_anomalous_images_only():
    head = RadarHead()
    torch.manual_seed(3)
    maps = torch.rand(3, 32, 32)
    maps[2] = 1.0  # a constant map has no Otsu split
    decisions = head.pixel_decisions(maps, torch.tensor([False, True, True]))
    assert not decisions[0].any() and not decisions[2].any()
    assert torch.equal(decisions[1], maps[1] >= float(threshold_otsu(maps[1].numpy())))


def test_radar_state_round_trips_through_a_weights_only_checkpoint(net, tmp_path):
    head = build_head("radar", map="attention")  # the map with fitted state of its own (mean attention rows)
    eps_fn = eps_fn_of(net)
    head.fit_train(iter([torch.randn(8, 8, 16, 16)]), eps_fn, A)
    torch.save(head.state_dict(), tmp_path / "radar.pt")
    fresh = build_head("radar", map="attention")
    fresh.load_state_dict(torch.load(tmp_path / "radar.pt", weights_only=True))
    z0 = torch.randn(2, 8, 16, 16)
    a, b = head.evaluate(z0, eps_fn, A), fresh.evaluate(z0, eps_fn, A)
    assert torch.equal(a.map, b.map) and torch.equal(head.score(a)[0], fresh.score(b)[0])


def test_unfitted_radar_and_bad_map_say_how_to_fix(net):
    with pytest.raises(RuntimeError, match="not fitted"):
        build_head("radar", map="attention").evaluate(torch.randn(1, 8, 16, 16), eps_fn_of(net), A)
    with pytest.raises(ValueError, match="map"):
        RadarHead(map="gradcam")


def fitted_noise_radar(**kwargs) -> tuple[RadarHead, object]:
    """A radar head on the noise map (an identity stands in for the denoiser), fitted on 64 normal
    images, with its outputs on 100 held-out normal images."""
    torch.manual_seed(5)
    head = build_head("radar", map="noise", **kwargs)
    identity = lambda x, t: x
    head.fit_train(iter([torch.randn(64, 4, 8, 8)]), identity, A)
    return head, head.evaluate(torch.randn(100, 4, 8, 8), identity, A)


def test_radar_threshold_is_the_percentile_of_its_own_validation_scores():
    head, val = fitted_noise_radar()
    head.calibrate(val, "percentile", 99.0)
    scores = head.score(val)[0]
    assert float(head.threshold) == pytest.approx(float(np.percentile(scores.numpy(), 99)))
    assert int((scores >= head.threshold).sum()) == 1  # 1 % of 100 validation normals


def test_radar_decision_detector_deploys_the_forests_boundary_and_contamination():
    head, val = fitted_noise_radar(decision="detector")
    head.calibrate(val, "percentile", 99.0)
    forest = head.forest.estimator
    features = torch.stack([val.terms["l2"], val.terms["local_max"]], dim=1).numpy()  # [B, 2]
    flagged = (head.score(val)[0] >= head.threshold).numpy()
    assert (flagged == (forest.predict(features) == -1)).all() and flagged.sum() > 1
    head, _ = fitted_noise_radar(decision="detector", contamination=0.1)
    training = head.forest.anomaly_score(head.forest.points)  # the forest's 64 training images
    assert abs(float((training >= head.forest.threshold).double().mean()) - 0.1) <= 1 / 64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decision": "otsu"}, "decision must be"),
        ({"decision": "detector", "contamination": 0.0}, r"contamination must be 'auto' or a number in \(0, 0.5\]"),
        ({"contamination": 0.2}, "decision: detector"),
    ],
)
def test_bad_radar_decision_options_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RadarHead(**kwargs)
