import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import IRFHead, build_head
from ad_lightning.heads.irf import Gaussian

A = linear_alpha_bar(1000)


def double(x, t):
    return 2.0 * x


def reference_distance(train: np.ndarray, x: np.ndarray, ridge: float) -> float:
    """Mahalanobis distance of x under N(mean, cov + ridge I) of the rows of `train`, via scipy."""
    cov = np.cov(train, rowvar=False) + ridge * np.eye(train.shape[1])
    return mahalanobis(x, train.mean(0), np.linalg.inv(cov))


def test_per_position_full_gaussian_matches_scipy():
    torch.manual_seed(0)
    train = torch.randn(40, 3, 2, 2, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    test = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    g = Gaussian("position", "full", ridge=0.01)
    g.fit(iter(train.split(7)))  # streamed in uneven chunks
    got = g.distance(test)
    assert got.shape == (2, 2, 2)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                want = reference_distance(train[:, :, i, j].numpy(), test[b, :, i, j].numpy(), 0.01)
                assert float(got[b, i, j]) == pytest.approx(want, rel=1e-4)


def test_global_and_diagonal_gaussians_match_numpy():
    torch.manual_seed(1)
    train = torch.randn(10, 4, 3, 3, dtype=torch.float64) + 1.0
    test = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    vectors = train.permute(0, 2, 3, 1).reshape(-1, 4).numpy()  # every position of every image
    g = Gaussian("global", "full", ridge=0.01)
    g.fit([train])
    assert float(g.distance(test)[0, 1, 2]) == pytest.approx(reference_distance(vectors, test[0, :, 1, 2].numpy(), 0.01), rel=1e-4)
    d = Gaussian("global", "diagonal", ridge=0.01)
    d.fit([train])
    var = vectors.var(0, ddof=1) + 0.01
    want = math.sqrt(((test[0, :, 1, 2].numpy() - vectors.mean(0)) ** 2 / var).sum())
    assert float(d.distance(test)[0, 1, 2]) == pytest.approx(want, rel=1e-4)


def test_unfitted_or_wrong_grid_gaussian_says_how_to_fix():
    g = Gaussian()
    with pytest.raises(RuntimeError, match="not fitted"):
        g.distance(torch.zeros(1, 2, 2, 2))
    g.fit([torch.randn(5, 2, 2, 2)])
    with pytest.raises(ValueError, match="positions"):
        g.distance(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="position|global"):
        Gaussian("pixel")


@pytest.mark.parametrize("mode", ["clean", "noise_free"])
def test_residual_is_z0_minus_predicted_x0_at_t_star(mode):
    z0 = torch.randn(2, 3, 4, 4)
    head = IRFHead(t_star=200, input=mode)
    a = float(A[200])
    x = z0 if mode == "clean" else math.sqrt(a) * z0
    r, eps = head.residual(z0, double, A)
    assert torch.allclose(eps, 2 * x)
    assert torch.allclose(r, z0 - (x - math.sqrt(1 - a) * 2 * x) / math.sqrt(a), atol=1e-5)
    assert head.nfe == 1


def test_stochastic_input_is_seeded_and_shared_by_images():
    z0 = torch.zeros(3, 2, 4, 4)
    seen = []
    head = IRFHead(input="stochastic", seed=3)
    head.residual(z0, lambda x, t: seen.append(x) or x, A)
    head.residual(z0, lambda x, t: seen.append(x) or x, A)
    IRFHead(input="stochastic", seed=4).residual(z0, lambda x, t: seen.append(x) or x, A)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    assert torch.equal(seen[0][0], seen[0][2]) and float(seen[0].abs().sum()) > 0


def test_head_scores_an_outlier_position_highest_with_max_and_topk():
    torch.manual_seed(2)
    train = [torch.randn(16, 3, 4, 4) for _ in range(3)]
    test = torch.randn(2, 3, 4, 4)
    test[1, :, 2, 1] += 8.0
    for reduction in ("max", "topk"):
        head = build_head("irf", reduction=reduction, topk=3, input="clean")
        head.fit_train(iter(train), double, A)
        out = head.evaluate(test, double, A)
        score, m = head.score(out)
        assert m.shape == (2, 4, 4) and int(m[1].flatten().argmax()) == 2 * 4 + 1
        assert score[1] > score[0]
        if reduction == "topk":
            assert float(score[1]) == pytest.approx(float(m[1].flatten().topk(3).values.mean()))
        norm = (2 * test).norm(dim=1).flatten(1)  # prior term: ||eps|| per position
        want = norm.amax(1) if reduction == "max" else norm.topk(3, dim=1).values.mean(1)
        assert torch.allclose(out.terms["prior"], want, atol=1e-5)


def test_fitted_gaussian_survives_a_weights_only_checkpoint(tmp_path):
    head = build_head("irf", input="clean")
    head.fit_train(iter([torch.randn(8, 3, 4, 4)]), double, A)
    torch.save(head.state_dict(), tmp_path / "irf.pt")
    fresh = build_head("irf", input="clean")
    fresh.load_state_dict(torch.load(tmp_path / "irf.pt", weights_only=True))
    z0 = torch.randn(2, 3, 4, 4)
    assert torch.equal(head.evaluate(z0, double, A).map, fresh.evaluate(z0, double, A).map)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="t_star"):
        IRFHead(t_star=1000)
    with pytest.raises(ValueError, match="input"):
        IRFHead(input="noisy")


def test_full_gaussian_fits_after_the_thread_count_changes():
    """torch 2.14.1's MKL batched LU inverse fails once torch.set_num_threads(2) was called (the
    experiments and benchmarks set threads); the Cholesky inverse the Gaussian uses does not."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        r = torch.randn(400, 152, 16, 16, generator=torch.Generator().manual_seed(0))  # the demo's feature grid
        gaussian = Gaussian(per="position", covariance="full", ridge=0.01)
        gaussian.fit([r[:200], r[200:]])
    finally:
        torch.set_num_threads(threads)
    v = r[:, :, 3, 5].double()  # position 3 * 16 + 5
    cov = torch.cov(v.T) + 0.01 * torch.eye(152, dtype=torch.float64)
    assert torch.allclose(gaussian.precision[3 * 16 + 5].double() @ cov, torch.eye(152, dtype=torch.float64), atol=1e-4)
