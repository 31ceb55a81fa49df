import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from ad_lightning.features.backbone import aggregate
from ad_lightning.heads import PatchCoreHead, build_head
from ad_lightning.heads.patchcore import coreset_size, greedy_coreset, nearest, random_projection


def numpy_k_center(x: np.ndarray, size: int, start: int) -> list[int]:
    """Textbook greedy k-center: keep each point's distance to its closest centre, add the farthest."""
    chosen = [start]
    closest = np.linalg.norm(x - x[start], axis=1)
    while len(chosen) < size:
        chosen.append(int(np.argmax(closest)))
        closest = np.minimum(closest, np.linalg.norm(x - x[chosen[-1]], axis=1))
    return chosen


def covering_radius(x: np.ndarray, centres: np.ndarray) -> float:
    """Largest distance from a point to its closest centre."""
    return float(cdist(x, centres).min(1).max())


def fitted(train: torch.Tensor, **kwargs) -> PatchCoreHead:
    head = build_head("patchcore", **kwargs)
    head.fit_train(iter(train.split(3)), None, None)
    return head


@pytest.mark.parametrize("chunk", [1, 10, 4096])
@pytest.mark.parametrize("k", [1, 4])
def test_nearest_matches_scipy_brute_force(chunk, k):
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(37, 6)).astype(np.float32)
    queries = np.concatenate([rng.normal(size=(102, 6)), bank[5:6]]).astype(np.float32)  # last one is in the bank
    distances, indices = nearest(torch.from_numpy(queries), torch.from_numpy(bank), k=k, chunk=chunk)
    reference = cdist(queries.astype(np.float64), bank.astype(np.float64))
    order = np.argsort(reference, axis=1)[:, :k]
    assert distances.shape == (103, k) and indices.shape == (103, k)
    np.testing.assert_array_equal(indices.numpy(), order)
    np.testing.assert_allclose(distances.numpy(), np.take_along_axis(reference, order, 1), rtol=1e-5)
    assert float(distances[-1, 0]) == 0.0  # exact, not the square root of a cancellation error


def test_coreset_size_is_the_ceiling_of_ratio_times_count():
    assert coreset_size(30, 0.1) == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    assert coreset_size(37, 0.1) == 4
    assert coreset_size(5, 0.01) == 1
    head = fitted(torch.randn(6, 4, 3, 5), coreset_ratio=0.1)  # 6 * 15 = 90 positions
    assert head.memory_bank.shape == (9, 4)
    head = fitted(torch.randn(5, 4, 3, 5), coreset_ratio=0.1)  # 75 positions -> 7.5 -> 8
    assert head.memory_bank.shape == (8, 4)


@pytest.mark.parametrize("start", [0, 17, 59])
def test_greedy_coreset_matches_numpy_k_center(start):
    x = np.random.default_rng(1).normal(size=(60, 5))
    got = greedy_coreset(torch.from_numpy(x), 12, start)
    assert got.tolist() == numpy_k_center(x, 12, start)


def test_head_selects_on_the_seeded_projection():
    x = torch.randn(4, 10, 5, 5, generator=torch.Generator().manual_seed(2))  # 100 positions of 10 channels
    head = fitted(x, aggregate=1, coreset_ratio=0.2, projection_dim=4, seed=3)
    vectors = x.permute(0, 2, 3, 1).reshape(-1, 10)  # [4, 10, 5, 5] -> [100, 10]
    bank = head.memory_bank
    chosen = [int(np.flatnonzero((vectors == row).all(1))[0]) for row in bank]
    projected = random_projection(vectors, 4, 3).double().numpy()
    assert chosen == numpy_k_center(projected, 20, chosen[0])
    again = fitted(x, aggregate=1, coreset_ratio=0.2, projection_dim=4, seed=3).memory_bank
    other = fitted(x, aggregate=1, coreset_ratio=0.2, projection_dim=4, seed=4).memory_bank
    assert torch.equal(again, head.memory_bank) and not torch.equal(other, head.memory_bank)


def test_random_projection_keeps_pairwise_distances():
    x = torch.randn(40, 600, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = random_projection(x, 128, seed=0)
    assert y.shape == (40, 128)
    ratio = torch.pdist(y) / torch.pdist(x)
    assert 0.7 < float(ratio.min()) and float(ratio.max()) < 1.3  # JL: about 1 +- 3 / sqrt(128)
    assert torch.equal(random_projection(x, 128, seed=0), y)
    assert random_projection(x, 600, seed=0) is x and random_projection(x, 0, seed=0) is x


def test_ratio_one_keeps_every_patch_in_order():
    x = torch.randn(4, 3, 2, 5)
    head = fitted(x, aggregate=1, coreset_ratio=1.0)
    assert torch.equal(head.memory_bank, x.permute(0, 2, 3, 1).reshape(-1, 3))  # [4, 3, 2, 5] -> [40, 3]
    padded = fitted(x, aggregate=3, count_padding=True, coreset_ratio=1.0)
    assert torch.allclose(padded.memory_bank[10], x[1, :, :2, :2].sum(dim=(1, 2)) / 9)  # image 1's corner


def test_coreset_covers_clustered_data_better_than_a_random_subset():
    rng = np.random.default_rng(3)
    sizes = [300, 150, 60, 30, 20, 10, 5, 5]  # 580 points; small clusters are easy to miss at random
    centres = rng.normal(scale=20.0, size=(8, 16))
    x = np.concatenate([c + rng.normal(scale=0.1, size=(n, 16)) for c, n in zip(centres, sizes)])
    chosen = PatchCoreHead(coreset_ratio=8 / 580, projection_dim=8, seed=0).subsample(torch.from_numpy(x))
    random = rng.choice(len(x), size=8, replace=False)
    assert len(chosen) == 8
    greedy_radius, random_radius = covering_radius(x, x[chosen.numpy()]), covering_radius(x, x[random])
    assert greedy_radius < 1.0 and random_radius > 10.0  # one centre in every cluster vs a missed cluster


def test_reweighting_matches_a_hand_computation():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    train = bank[:, :, None, None]  # four 1 x 1 images: [4, C=2, 1, 1]
    test = torch.tensor([[[[0.0, 0.5]], [[-1.0, 0.0]]]])  # one 1 x 2 image: patches (0, -1) and (0.5, 0)
    # m* = (0, 0), s* = 1; from m_test the bank is at 1, sqrt(2), 3 and sqrt(61)
    d = [1.0, math.sqrt(2), 3.0, math.sqrt(61)]
    for b, want in ((3, 1 - math.e / sum(math.exp(v) for v in d[:3])), (9, 1 - math.e / sum(math.exp(v) for v in d))):
        head = fitted(train, aggregate=1, coreset_ratio=1.0, num_neighbors=b)
        out = head.evaluate(test, None, None)
        assert float(out.score[0]) == pytest.approx(want * 1.0, rel=1e-6)
        assert float(out.terms["max_distance"][0]) == pytest.approx(1.0)
        assert torch.allclose(out.map, torch.tensor([[[1.0, 0.5]]]))
    plain = fitted(train, aggregate=1, coreset_ratio=1.0, num_neighbors=1).evaluate(test, None, None)
    assert float(plain.score[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("size", [1, 3])
def test_an_outlier_patch_gets_the_highest_map_value_and_score(size):
    generator = torch.Generator().manual_seed(4)
    train = torch.randn(30, 8, 5, 7, generator=generator)
    test = torch.randn(2, 8, 5, 7, generator=generator)
    test[1, :, 1, 4] += 12.0  # row 1, column 4 of a 5 x 7 grid: a transpose or flip moves it
    head = fitted(train, aggregate=size, coreset_ratio=0.25)
    out = head.evaluate(test, None, None)
    score, m = head.score(out)
    assert m.shape == (2, 5, 7) and score[1] > score[0]
    if size == 1:
        assert int(m[1].flatten().argmax()) == 1 * 7 + 4
    else:  # aggregation spreads the outlier over its 3 x 3 neighbourhood, and only there
        row, col = divmod(int(m[1].flatten().argmax()), 7)
        assert abs(row - 1) <= 1 and abs(col - 4) <= 1
        assert float(m[1, 1, 4]) > float(m[1, 3:, :2].max())


def test_state_dict_round_trip_gives_identical_scores(tmp_path):
    head = fitted(torch.randn(6, 5, 4, 4), coreset_ratio=0.3)
    torch.save(head.state_dict(), tmp_path / "patchcore.pt")
    fresh = build_head("patchcore", coreset_ratio=0.3)
    fresh.load_state_dict(torch.load(tmp_path / "patchcore.pt", weights_only=True))
    z0 = torch.randn(3, 5, 4, 4)
    want, got = head.evaluate(z0, None, None), fresh.evaluate(z0, None, None)
    assert torch.equal(want.score, got.score) and torch.equal(want.map, got.map)


def test_aggregation_is_the_mean_of_the_3x3_neighbourhood():
    z0 = torch.randn(2, 3, 5, 6)
    pooled = aggregate(z0, 3)
    assert torch.allclose(pooled[1, :, 2, 3], z0[1, :, 1:4, 2:5].mean(dim=(1, 2)))
    assert torch.allclose(pooled[1, :, 0, 0], z0[1, :, :2, :2].mean(dim=(1, 2)))  # 4 neighbours, not 9
    assert torch.allclose(pooled[0, :, 4, 5], z0[0, :, 3:, 4:].mean(dim=(1, 2)))
    assert aggregate(z0, 1) is z0
    padded = aggregate(z0, 3, count_padding=True)  # zeros outside the grid count: always 9 terms
    assert torch.allclose(padded[1, :, 0, 0], z0[1, :, :2, :2].sum(dim=(1, 2)) / 9)
    assert torch.allclose(padded[1, :, 2, 3], pooled[1, :, 2, 3])


def test_head_protocol_and_errors():
    head = build_head("patchcore")
    assert head.nfe == 0 and head.needs_train_fit and head.blur_sigma == 4.0
    with pytest.raises(RuntimeError, match="memory bank"):
        head.evaluate(torch.zeros(1, 2, 3, 3), None, None)
    with pytest.raises(ValueError, match="normal training images"):
        head.fit_train(iter([]), None, None)
    for bad in ({"aggregate": 2}, {"coreset_ratio": 0.0}, {"coreset_ratio": 1.5}, {"num_neighbors": 0}):
        with pytest.raises(ValueError, match="patchcore"):
            PatchCoreHead(**bad)
