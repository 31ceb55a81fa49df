import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from scipy.stats import multivariate_normal

from ad_lightning.diffusion import linear_alpha_bar
from ad_lightning.heads import IRFHead, build_head
from ad_lightning.heads.irf import Gaussian

A = linear_alpha_bar(1000)
A333 = 0.31862  # alpha_bar at t = 333 of the linear schedule, the published value


def predicts_zero_x0(x, t):
    """A network whose clean-sample estimate is 0: eps = x / sqrt(1 - a_t), so x - sqrt(1 - a_t) eps = 0."""
    return x / torch.sqrt(1 - A[t]).to(x.dtype).view(-1, 1, 1, 1)


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
    got = g.map(test)
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
    assert float(g.map(test)[0, 1, 2]) == pytest.approx(reference_distance(vectors, test[0, :, 1, 2].numpy(), 0.01), rel=1e-4)
    d = Gaussian("global", "diagonal", ridge=0.01)
    d.fit([train])
    var = vectors.var(0, ddof=1) + 0.01
    want = math.sqrt(((test[0, :, 1, 2].numpy() - vectors.mean(0)) ** 2 / var).sum())
    assert float(d.map(test)[0, 1, 2]) == pytest.approx(want, rel=1e-4)


def test_unfitted_or_wrong_grid_gaussian_says_how_to_fix():
    g = Gaussian()
    with pytest.raises(RuntimeError, match="not fitted"):
        g.map(torch.zeros(1, 2, 2, 2))
    g.fit([torch.randn(5, 2, 2, 2)])
    with pytest.raises(ValueError, match="positions"):
        g.map(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="position|global"):
        Gaussian("pixel")


@pytest.mark.parametrize("mode", ["clean", "noise_free", "stochastic"])
def test_the_residual_is_z0_when_the_network_estimates_x0_as_zero(mode):
    z0 = torch.randn(2, 3, 4, 4)
    head = IRFHead(t_star=333, input=mode)
    r = head.residual(z0, predicts_zero_x0, A, 333)[0]
    torch.testing.assert_close(r, z0, rtol=1e-5, atol=1e-5)
    assert head.nfe == 1


def test_the_residual_of_a_network_predicting_the_true_noise_is_zero():
    """The true noise of the noise-free state sqrt(a) z0 is 0, of the stochastic state the seeded field; the
    clean state z0 read as a noisy sample with eps = 0 has x0_hat = z0 / sqrt(a): r = (1 - 1/sqrt(a)) z0."""
    z0 = torch.randn(2, 3, 4, 4)
    zero = lambda x, t: torch.zeros_like(x)
    seeded = lambda x, t: torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(5)).expand_as(x)
    assert IRFHead(t_star=333, input="noise_free").residual(z0, zero, A, 333)[0].abs().max() < 1e-6
    assert IRFHead(t_star=333, input="stochastic", seed=5).residual(z0, seeded, A, 333)[0].abs().max() < 1e-5
    r, eps = IRFHead(t_star=333, input="clean").residual(z0, zero, A, 333)
    torch.testing.assert_close(r, (1 - 1 / math.sqrt(A333)) * z0, rtol=1e-4, atol=1e-5)
    assert torch.equal(eps, torch.zeros_like(z0))


def test_stochastic_input_is_seeded_and_shared_by_images():
    z0 = torch.zeros(3, 2, 4, 4)
    seen = []
    head = IRFHead(input="stochastic", seed=3)
    head.residual(z0, lambda x, t: seen.append(x) or x, A, 200)
    head.residual(z0, lambda x, t: seen.append(x) or x, A, 200)
    IRFHead(input="stochastic", seed=4).residual(z0, lambda x, t: seen.append(x) or x, A, 200)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    assert torch.equal(seen[0][0], seen[0][2]) and float(seen[0].abs().sum()) > 0


def test_head_scores_an_outlier_position_highest_with_max_and_topk():
    torch.manual_seed(2)
    train = [torch.randn(16, 3, 4, 4) for _ in range(3)]
    test = torch.randn(2, 3, 4, 4)
    test[1, :, 2, 1] += 8.0
    # x0_hat = 0, so the residual is z0: each test position's scipy distance under its position's Gaussian,
    # and the prior's ||eps|| = ||z0|| / sqrt(1 - a) with the published a_333
    vectors = torch.cat(train).flatten(2).double().numpy()  # [N, C, h, w] -> [N, C, h*w]
    points = test.flatten(2).double().numpy()  # [2, C, h*w]
    d = np.array([[reference_distance(vectors[:, :, p], points[b, :, p], 0.01) for p in range(16)] for b in range(2)])
    norms = np.linalg.norm(points, axis=1) / math.sqrt(1 - A333)  # [2, h*w]
    assert int(d[1].argmax()) == 2 * 4 + 1
    for reduction, top in (("max", 1), ("topk", 3)):
        head = build_head("irf", t_star=333, reduction=reduction, topk=3, input="clean")
        head.fit_train(iter(train), predicts_zero_x0, A)
        out = head.evaluate(test, predicts_zero_x0, A)
        score, m = head.score(out)
        assert m.shape == (2, 4, 4) and int(m[1].flatten().argmax()) == 2 * 4 + 1
        np.testing.assert_allclose(score.numpy(), np.sort(d, axis=1)[:, -top:].mean(1), rtol=1e-4)
        np.testing.assert_allclose(out.terms["prior"].numpy(), np.sort(norms, axis=1)[:, -top:].mean(1), rtol=1e-4)
        assert score[1] > score[0]


def test_per_position_diagonal_gaussian_distance_by_hand():
    """`covariance: diagonal`, one Gaussian per position, absolute ridge: sqrt(sum_c (x_c - mu_c)^2 / (var_c + ridge))
    with numpy's per-position mean and unbiased variance of the training residuals (here z0 itself)."""
    train, test = scaled_train(8), torch.randn(2, 3, 2, 2, dtype=torch.float64) * 3
    train[:, :, 0, 1] *= 10.0  # one position far more spread out than the others
    head = build_head("irf", t_star=333, covariance="diagonal", ridge=0.01, input="noise_free")
    head.fit_train(iter(train.float().split(9)), predicts_zero_x0, A)
    got = head.evaluate(test.float(), predicts_zero_x0, A).map
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        vectors = train[:, :, i, j].numpy()
        var = vectors.var(0, ddof=1) + 0.01
        for b in range(2):
            want = math.sqrt(((test[b, :, i, j].numpy() - vectors.mean(0)) ** 2 / var).sum())
            assert float(got[b, i, j]) == pytest.approx(want, rel=1e-4)


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


def scaled_train(seed: int) -> torch.Tensor:
    """40 residual fields [40, 3, 2, 2] whose channels have different spreads."""
    torch.manual_seed(seed)
    return torch.randn(40, 3, 2, 2, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 0.3


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_log_density_map_is_scipys_negative_log_pdf_without_constants(covariance):
    train, test = scaled_train(3), torch.randn(2, 3, 2, 2, dtype=torch.float64) * 2
    train[:, :, 1, 1] *= 5.0  # one position far more spread out: its log-determinant differs
    g = Gaussian("position", covariance, ridge=0.01, score="log_density")
    g.fit(iter(train.split(9)))
    got = g.map(test)
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        vectors = train[:, :, i, j].numpy()
        cov = np.cov(vectors, rowvar=False)
        cov = (cov if covariance == "full" else np.diag(np.diag(cov))) + 0.01 * np.eye(3)
        for b in range(2):
            logpdf = multivariate_normal.logpdf(test[b, :, i, j].numpy(), vectors.mean(0), cov)
            want = -logpdf - 1.5 * math.log(2 * math.pi)  # the C/2 log(2 pi) constant dropped
            assert float(got[b, i, j]) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_global_log_density_shares_one_log_determinant():
    train = scaled_train(4)
    g = Gaussian("global", "full", ridge=0.01, score="log_density")
    g.fit([train])
    vectors = train.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    cov = np.cov(vectors, rowvar=False) + 0.01 * np.eye(3)
    want = -multivariate_normal.logpdf(x[0, :, 1, 0].numpy(), vectors.mean(0), cov) - 1.5 * math.log(2 * math.pi)
    assert float(g.map(x)[0, 1, 0]) == pytest.approx(want, rel=1e-4)


def test_relative_ridge_is_a_fraction_of_each_positions_mean_variance():
    train = scaled_train(5)
    train[:, :, 0, 1] *= 100.0  # a position 100 x larger: its ridge scales with it, an absolute one would not
    test = torch.randn(1, 3, 2, 2, dtype=torch.float64) * 50
    full = Gaussian("position", "full", ridge=0.5, ridge_mode="relative")
    full.fit([train])
    diagonal = Gaussian("position", "diagonal", ridge=0.5, ridge_mode="relative")
    diagonal.fit([train])
    for i, j in [(0, 0), (0, 1), (1, 0)]:
        vectors, x = train[:, :, i, j].numpy(), test[0, :, i, j].numpy()
        cov = np.cov(vectors, rowvar=False)
        lam = 0.5 * np.trace(cov) / 3
        want = mahalanobis(x, vectors.mean(0), np.linalg.inv(cov + lam * np.eye(3)))
        assert float(full.map(test)[0, i, j]) == pytest.approx(want, rel=1e-4)
        var = vectors.var(0, ddof=1)
        want = np.sqrt(((x - vectors.mean(0)) ** 2 / (var + 0.5 * var.mean())).sum())
        assert float(diagonal.map(test)[0, i, j]) == pytest.approx(want, rel=1e-4)


def test_several_t_stars_average_the_maps_of_one_gaussian_per_t_star(tmp_path):
    torch.manual_seed(6)
    train, test = [torch.randn(12, 3, 4, 4) for _ in range(2)], torch.randn(2, 3, 4, 4)
    eps_fn = lambda x, t: torch.tanh(x) * (1 + t.float().view(-1, 1, 1, 1) / 100)  # differs per t*
    multi = build_head("irf", t_star=[100, 400], input="clean", reduction="topk", topk=3)
    multi.fit_train(iter(train), eps_fn, A)
    singles = [build_head("irf", t_star=t, input="clean", reduction="topk", topk=3) for t in (100, 400)]
    for head in singles:
        head.fit_train(iter(train), eps_fn, A)
    out = multi.evaluate(test, eps_fn, A)
    maps = [head.evaluate(test, eps_fn, A).map for head in singles]
    assert multi.nfe == 2 and not torch.allclose(maps[0], maps[1])
    assert torch.allclose(out.map, (maps[0] + maps[1]) / 2, atol=1e-5)
    norm = (eps_fn(test, torch.full((2,), 100)).norm(dim=1) + eps_fn(test, torch.full((2,), 400)).norm(dim=1)) / 2
    assert torch.allclose(out.terms["prior"], norm.flatten(1).topk(3, dim=1).values.mean(1), atol=1e-5)
    assert {k for k in multi.state_dict() if k.startswith("gaussian")} == {
        "gaussians.100.mean", "gaussians.100.precision", "gaussians.400.mean", "gaussians.400.precision"
    }  # fmt: skip
    torch.save(multi.state_dict(), tmp_path / "irf.pt")
    fresh = build_head("irf", t_star=[100, 400], input="clean", reduction="topk", topk=3)
    fresh.load_state_dict(torch.load(tmp_path / "irf.pt", weights_only=True))
    assert torch.equal(fresh.evaluate(test, eps_fn, A).map, out.map)


def test_a_single_t_star_state_dict_as_written_before_the_options_loads():
    """Checkpoints written before the score, ridge and multi-t* options hold exactly these buffers;
    one built by hand from numpy statistics loads and scores as scipy's Mahalanobis distance."""
    train = scaled_train(7)
    vectors = train.permute(0, 2, 3, 1).reshape(40, 4, 3).numpy()  # [N, C, h, w] -> [N, h*w, C]
    covs = [np.cov(vectors[:, p], rowvar=False) + 0.01 * np.eye(3) for p in range(4)]
    state = {
        "threshold": torch.tensor(1.5, dtype=torch.float64),
        "map_low": torch.tensor(0.1, dtype=torch.float64),
        "map_high": torch.tensor(4.0, dtype=torch.float64),
        "gaussian.mean": torch.from_numpy(vectors.mean(0)).float(),
        "gaussian.precision": torch.from_numpy(np.stack([np.linalg.inv(c) for c in covs])).float(),
    }
    head = build_head("irf", input="clean")
    assert set(head.state_dict()) == set(state)  # one t*: the same layout as before
    head.load_state_dict(state)
    test = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    want = mahalanobis(test[0, :, 1, 0].numpy(), vectors[:, 2].mean(0), np.linalg.inv(covs[2]))
    assert float(head.gaussian.map(test)[0, 1, 0]) == pytest.approx(want, rel=1e-4)
    assert float(head.threshold) == 1.5


def test_log_density_state_round_trips(tmp_path):
    head = build_head("irf", input="clean", score="log_density", ridge_mode="relative")
    head.fit_train(iter([torch.randn(8, 3, 4, 4)]), double, A)
    torch.save(head.state_dict(), tmp_path / "irf.pt")
    fresh = build_head("irf", input="clean", score="log_density", ridge_mode="relative")
    fresh.load_state_dict(torch.load(tmp_path / "irf.pt", weights_only=True))
    z0 = torch.randn(2, 3, 4, 4)
    assert fresh.gaussian.log_det.shape == (16,)
    assert torch.equal(head.evaluate(z0, double, A).map, fresh.evaluate(z0, double, A).map)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score": "likelihood"}, "score"),
        ({"ridge_mode": "scaled"}, "ridge_mode"),
        ({"ridge": 0.0}, "ridge must be positive"),
        ({"t_star": [100, 100]}, "distinct"),
        ({"t_star": []}, "t_star"),
        ({"t_star": [100, 1000]}, r"t_star must be in \[0, 999\]"),
    ],
)
def test_bad_irf_options_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IRFHead(**kwargs)
