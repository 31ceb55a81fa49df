import pytest
import torch

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import EnsembleHead, HeadOutput, build_head
from ad_lightning.heads.novelty import NoveltyDetector

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
    head.calibrate(head.evaluate(torch.randn(10, 3, 4, 4), None, A))
    test = torch.randn(2, 3, 4, 4)
    test[1] += 5.0
    score, m = head.score(head.evaluate(test, None, A))
    assert head.nfe == 0 and m is None and score[1] > score[0]
    assert float(head.threshold) == pytest.approx(head.detector.threshold)


def test_ensemble_z_scores_members_on_validation_and_weights_them():
    heads = {"likelihood": build_head("likelihood"), "irf": build_head("irf"), "iforest": build_head("iforest")}
    e = EnsembleHead({"likelihood": 2.0, "iforest": 1.0})
    e.bind(heads)
    assert e.nfe == 3
    finals = {"likelihood": (torch.tensor([1.0, 3.0]), torch.ones(2, 2, 2)), "iforest": (torch.tensor([10.0, 30.0]), None)}
    e.calibrate(e.combine(finals))
    score, m = e.score(e.combine({"likelihood": (torch.tensor([2.0]), torch.ones(1, 2, 2)), "iforest": (torch.tensor([40.0]), None)}))
    std_l, std_i = torch.tensor([1.0, 3.0]).std(), torch.tensor([10.0, 30.0]).std()
    assert float(score[0]) == pytest.approx(float(2.0 * (2.0 - 2.0) / std_l + (40.0 - 20.0) / std_i), rel=1e-5)
    assert m.shape == (1, 2, 2)
    with pytest.raises(ValueError, match="before ensemble"):
        EnsembleHead({"radar": 1.0}).bind(heads)


def test_heads_without_fitted_state_fail_clearly():
    with pytest.raises(RuntimeError, match="not fitted"):
        build_head("lof").evaluate(torch.randn(1, 3, 2, 2), None, A)
    assert isinstance(build_head("ocsvm").evaluate.__self__, torch.nn.Module)
    assert HeadOutput.cat([HeadOutput({"a": torch.ones(1)}, None), HeadOutput({"a": torch.zeros(2)}, None)]).terms["a"].shape == (3,)
