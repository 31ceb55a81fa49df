import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import EnsembleHead, HeadOutput, build_head
from ad_lightning.heads.novelty import NoveltyDetector
from ad_lightning.heads.pooled import pool

A = linear_alpha_bar(1000)


@pytest.mark.parametrize("kind", ["iforest", "lof", "ocsvm"])
def test_detector_fitted_on_normal_features_flags_an_obviously_shifted_sample(kind):
    torch.manual_seed(0)
    detector = NoveltyDetector(kind)
    detector.fit(torch.randn(300, 4))
    scores = detector.anomaly_score(torch.tensor([[0.0, 0.0, 0.0, 0.0], [8.0, 8.0, 8.0, 8.0]]))
    assert scores[1] >= detector.threshold > scores[0]


def test_detector_refits_identically_after_loading(tmp_path):
    a = NoveltyDetector("iforest", seed=5)
    a.fit(torch.randn(100, 2))
    torch.save(a.state_dict(), tmp_path / "d.pt")
    b = NoveltyDetector("iforest", seed=5)
    b.load_state_dict(torch.load(tmp_path / "d.pt", weights_only=True))
    x = torch.randn(10, 2)
    assert torch.equal(a.anomaly_score(x), b.anomaly_score(x)) and a.threshold == b.threshold
    with pytest.raises(RuntimeError, match="not fitted"):
        NoveltyDetector().anomaly_score(x)
    with pytest.raises(ValueError, match="choose one of"):
        NoveltyDetector("dbscan")


def test_pooled_baseline_heads_use_no_network_and_no_map():
    torch.manual_seed(1)
    head = build_head("iforest")
    head.fit_train(iter([torch.randn(50, 3, 4, 4)]), None, A)
    val = head.evaluate(torch.randn(10, 3, 4, 4), None, A)
    head.calibrate(val)
    test = torch.randn(2, 3, 4, 4)
    test[1] += 5.0
    score, m = head.score(head.evaluate(test, None, A))
    assert head.nfe == 0 and m is None and score[1] > score[0]
    assert float(head.threshold) == pytest.approx(float(np.percentile(head.score(val)[0].numpy(), 99)))


def test_ensemble_z_scores_members_on_validation_and_weights_them():
    heads = {"likelihood": build_head("likelihood"), "irf": build_head("irf"), "iforest": build_head("iforest")}
    e = EnsembleHead({"likelihood": 2.0, "iforest": 1.0})
    e.bind(heads)
    assert e.nfe == 3
    likelihood, iforest = torch.arange(1.0, 13.0), torch.arange(12.0) ** 2  # 12 validation images
    finals = {"likelihood": (likelihood, torch.rand(12, 2, 2)), "iforest": (iforest, None)}
    e.calibrate(e.combine(finals))
    score, m = e.score(e.combine({"likelihood": (torch.tensor([2.0]), torch.ones(1, 2, 2)), "iforest": (torch.tensor([40.0]), None)}))
    want = 2.0 * (2.0 - 6.5) / likelihood.std() + (40.0 - iforest.mean()) / iforest.std()
    assert float(score[0]) == pytest.approx(float(want), rel=1e-5)
    assert m.shape == (1, 2, 2)
    with pytest.raises(ValueError, match="before ensemble"):
        EnsembleHead({"radar": 1.0}).bind(heads)


def test_heads_without_fitted_state_fail_clearly():
    with pytest.raises(RuntimeError, match="not fitted"):
        build_head("lof").evaluate(torch.randn(1, 3, 2, 2), None, A)
    with pytest.raises(RuntimeError, match="the ocsvm detector is not fitted"):
        build_head("ocsvm").evaluate(torch.randn(1, 3, 2, 2), None, A)
    assert HeadOutput.cat([HeadOutput({"a": torch.ones(1)}, None), HeadOutput({"a": torch.zeros(2)}, None)]).terms["a"].shape == (3,)


def fitted_pooled(kind: str, **kwargs):
    """A pooled baseline fitted on 200 normal images, 100 held-out normal images and its outputs on them."""
    torch.manual_seed(4)
    head = build_head(kind, **kwargs)
    head.fit_train(iter([torch.randn(200, 4, 3, 3)]), None, A)
    images = torch.randn(100, 4, 3, 3)
    return head, images, head.evaluate(images, None, A)


@pytest.mark.parametrize("kind", ["iforest", "lof", "ocsvm"])
def test_pooled_threshold_is_the_percentile_of_its_own_validation_scores(kind):
    head, _, val = fitted_pooled(kind)
    head.calibrate(val, "percentile", 99.0)
    scores = head.score(val)[0]
    assert float(head.threshold) == pytest.approx(float(np.percentile(scores.numpy(), 99)))
    assert int((scores >= head.threshold).sum()) == 1  # 1 % of 100 validation normals
    head.calibrate(val, "otsu")
    assert float(head.threshold) == pytest.approx(float(threshold_otsu(scores.numpy())))


@pytest.mark.parametrize("kind", ["iforest", "lof", "ocsvm"])
def test_decision_detector_deploys_the_detectors_own_boundary(kind):
    head, images, val = fitted_pooled(kind, decision="detector")
    head.calibrate(val, "percentile", 99.0)
    # scikit-learn's own decision: predict == -1 exactly where the score reaches the deployed threshold
    flagged = (head.score(val)[0] >= head.threshold).numpy()
    assert (flagged == (head.detector.estimator.predict(pool(images).numpy()) == -1)).all()
    assert flagged.sum() > 1  # another operating point than the 99th validation percentile's one image in 100


@pytest.mark.parametrize("kind", ["iforest", "lof"])
def test_contamination_sets_the_fraction_of_training_points_flagged(kind):
    detector = NoveltyDetector(kind, seed=2, contamination=0.1, decision="detector")
    detector.fit(torch.randn(400, 3, generator=torch.Generator().manual_seed(1)))
    flagged = detector.anomaly_score(detector.points) >= detector.threshold
    assert abs(float(flagged.double().mean()) - 0.1) <= 0.02  # LOF counts training points leave-one-out
    auto = NoveltyDetector(kind, seed=2, decision="detector")
    auto.fit(detector.points)
    assert auto.threshold != pytest.approx(detector.threshold)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decision": "percentile"}, "decision must be 'validation'"),
        ({"decision": "detector", "contamination": 0.7}, r"contamination must be 'auto' or a number in \(0, 0.5\]"),
        ({"decision": "detector", "contamination": "high"}, "contamination must be"),
        ({"contamination": 0.1}, "set `decision: detector`"),
    ],
)
def test_bad_decision_options_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_head("iforest", **kwargs)


def test_ocsvm_has_no_contamination():
    with pytest.raises(ValueError, match="contamination applies to iforest and lof only"):
        build_head("ocsvm", decision="detector", contamination=0.1)
