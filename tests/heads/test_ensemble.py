"""The ensemble head: a weighted sum of its members' scores and maps, each normalised with statistics of
the normal validation split, checked against sums computed by hand with numpy."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ad_lightning.heads import EnsembleHead

N_VAL, N_TEST = 12, 3  # 12 validation images: the plain z-score / min-max rules (the robust one is for < 10)


def finals(seed: int, n: int, with_map: tuple[bool, bool] = (True, True)) -> dict:
    """Members' final outputs {name: (score [n], map [n, 2, 3] or None)}, on different scales."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for (name, loc, spread), has_map in zip((("a", 5.0, 2.0), ("b", -1.0, 0.1)), with_map):
        score = loc + spread * torch.randn(n, generator=generator)
        amap = loc + spread * torch.randn(n, 2, 3, generator=generator)
        out[name] = (score, amap if has_map else None)
    return out


def ensemble(weights: dict[str, float], normalization: str, val: dict) -> EnsembleHead:
    head = EnsembleHead(weights, normalization)
    calls = lambda *keys: SimpleNamespace(network_calls=set(keys))
    head.bind({"a": calls(("a", 0), ("a", 1), ("shared", 0)), "b": calls(("shared", 0))})
    assert head.nfe == 3  # the call both members make counts once
    head.calibrate(head.combine(val))
    return head


def by_hand(values: np.ndarray, normal: np.ndarray, normalization: str) -> np.ndarray:
    """`values` normalised with the statistics of every `normal` value (all pixels of all maps for a map)."""
    normal = normal.astype(np.float64).ravel()
    if normalization == "zscore":
        return (values - normal.mean()) / normal.std(ddof=1)
    return (values - normal.min()) / (normal.max() - normal.min())


def expected(weights: dict[str, float], normalization: str, val: dict, test: dict) -> tuple[np.ndarray, np.ndarray]:
    score = sum(w * by_hand(test[m][0].numpy(), val[m][0].numpy(), normalization) for m, w in weights.items())
    maps = [w * by_hand(test[m][1].numpy(), val[m][1].numpy(), normalization) for m, w in weights.items()
            if test[m][1] is not None]  # fmt: skip
    return score, sum(maps)


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
def test_score_and_map_are_the_weighted_sums_of_validation_normalised_members(normalization):
    val, test = finals(0, N_VAL), finals(1, N_TEST)
    weights = {"a": 2.0, "b": 0.5}
    head = ensemble(weights, normalization, val)
    score, amap = head.score(head.combine(test))
    want_score, want_map = expected(weights, normalization, val, test)
    np.testing.assert_allclose(score.numpy(), want_score, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(amap.numpy(), want_map, rtol=1e-5, atol=1e-5)
    assert head.nfe == 3  # the members' distinct calls


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
def test_swapping_the_weights_changes_score_and_map_as_computed_by_hand(normalization):
    val, test = finals(0, N_VAL), finals(1, N_TEST)
    first_head, swapped_head = (ensemble(w, normalization, val) for w in ({"a": 2.0, "b": 0.5}, {"a": 0.5, "b": 2.0}))
    first, swapped = first_head.score(first_head.combine(test)), swapped_head.score(swapped_head.combine(test))
    want_score, want_map = expected({"a": 0.5, "b": 2.0}, normalization, val, test)
    np.testing.assert_allclose(swapped[0].numpy(), want_score, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(swapped[1].numpy(), want_map, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first[0], swapped[0]) and not torch.allclose(first[1], swapped[1])


def test_a_member_without_a_map_adds_to_the_score_only():
    val, test = finals(0, N_VAL, (True, False)), finals(1, N_TEST, (True, False))
    head = ensemble({"a": 2.0, "b": 0.5}, "zscore", val)
    score, amap = head.score(head.combine(test))
    want_score, _ = expected({"a": 2.0, "b": 0.5}, "zscore", val, test)
    np.testing.assert_allclose(score.numpy(), want_score, rtol=1e-5, atol=1e-5)
    member_a = 2.0 * by_hand(test["a"][1].numpy(), val["a"][1].numpy(), "zscore")
    np.testing.assert_allclose(amap.numpy(), member_a, rtol=1e-5)


def test_threshold_and_map_range_come_from_the_ensembles_own_validation_outputs():
    val = finals(0, N_VAL)
    weights = {"a": 2.0, "b": 0.5}
    head = ensemble(weights, "zscore", val)
    val_score, val_map = expected(weights, "zscore", val, val)
    assert float(head.threshold) == pytest.approx(float(np.percentile(val_score, 99)), rel=1e-5)
    assert (float(head.map_low), float(head.map_high)) == pytest.approx((val_map.min(), val_map.max()), rel=1e-5)


def test_weights_must_be_non_negative_and_members_configured():
    with pytest.raises(ValueError, match="non-negative"):
        EnsembleHead({"a": -1.0})
    with pytest.raises(ValueError, match="add them to --model.heads before ensemble"):
        EnsembleHead({"a": 1.0, "c": 1.0}).bind({"a": SimpleNamespace(network_calls={("a", 0)})})
