"""VisualReport: fixed sample, one colour scale for all maps, and the plots a `test` run writes."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from conftest import build_mvtec_tree
from PIL import Image

from ad_lightning.rendering import Example, FixedSample, colorize, heatmap_panels, select, thresholded
from ad_lightning.cli import main

SIZE = 8
FIT_AND_TEST = pytest.mark.slow  # tests of the `tested_run` fixture: fit + test, 26-60 s on the shared 2-core CPU


def example(path="c/test/good/000.png", category="c", label=0, value=0.0, decisions=None) -> Example:
    """A grey image whose `likelihood` map is `value` everywhere (and a radar map with its decisions)."""
    flat = torch.full((SIZE, SIZE), float(value))
    return Example(
        path=path,
        category=category,
        label=label,
        image=torch.full((3, SIZE, SIZE), 0.5),
        mask=torch.zeros(SIZE, SIZE, dtype=torch.bool),
        scores={"likelihood": float(value)},
        maps={"likelihood": flat, "radar": flat},
        decisions={} if decisions is None else {"radar": decisions},
    )


def test_colours_use_the_fixed_range_not_each_maps_own():
    low, high = 0.0, 10.0  # the head's map range on the normal validation split
    normal = torch.linspace(0.0, 2.0, SIZE * SIZE).reshape(SIZE, SIZE)  # well below map_high
    anomalous = torch.full((SIZE, SIZE), 10.0)
    cool, hot = colorize(normal, low, high, "jet"), colorize(anomalous, low, high, "jet")
    assert np.all(cool[..., 2] > cool[..., 0])  # blue over red everywhere: the normal image stays cool
    assert np.all(hot[..., 0] > hot[..., 2])
    # per-image min/max would paint the normal map's own maximum red; the fixed range does not
    assert cool[-1, -1, 0] < 0.1 and np.allclose(cool[-1, -1], colormaps["jet"](0.2)[:3])


def test_the_same_value_gets_the_same_colour_in_every_image():
    a = example("c/test/good/000.png", value=3.0)
    b = example("c/test/bad/000.png", label=1, value=3.0)
    a.maps["likelihood"][0] = 0.0  # a cooler top row: 3.0 is this map's maximum
    b.maps["likelihood"][0] = 9.0  # a hotter top row: 3.0 is this map's minimum
    panel_a, panel_b = (heatmap_panels(e, "likelihood", 0.0, 10.0, "jet")[2] for e in (a, b))
    np.testing.assert_allclose(panel_a[1:], panel_b[1:])  # rows where both maps are 3.0
    assert not np.allclose(panel_a[0], panel_b[0])


def test_panels_are_image_truth_map_and_thresholded():
    e = example(value=6.0)
    e.mask[2:4] = True
    image, truth, _, decided = heatmap_panels(e, "likelihood", 0.0, 5.0, "jet")
    assert image.shape == truth.shape == decided.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(truth[..., 0], e.mask.float().numpy())
    assert np.all(decided == 1.0)  # no pixel decisions of its own: map 6 >= map_high 5


def test_thresholded_map_is_the_heads_own_decisions_when_it_makes_them():
    decisions = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    decisions[0, 0] = True
    e = example(value=100.0, decisions=decisions)
    assert torch.equal(thresholded(e, "radar", high=1.0), decisions)  # not map >= high (all True)
    assert bool(thresholded(e, "likelihood", high=1.0).all())


def test_fixed_sample_is_the_first_images_whatever_the_order():
    """First k anomalous and first k normal per category by (file name, path), for any arrival order
    or split over ranks: the first image of each defect type before the second of any."""
    defects = ("good", "hole", "scratch")
    pool = [example(f"{c}/test/{d}/{i:03d}.png", c, int(d != "good")) for c in "xy" for d in defects for i in range(6)]
    first = ("hole/000.png", "scratch/000.png", "hole/001.png", "good/000.png", "good/001.png", "good/002.png")
    expected = [f"{c}/test/{p}" for c in "xy" for p in first]
    for seed in range(5):
        shuffled = random.Random(seed).sample(pool, len(pool))
        sample = FixedSample(per_label=3)
        for e in shuffled:
            sample.offer(e)
        assert [e.path for e in sample.examples] == expected
        halves = [select(shuffled[: len(pool) // 2], 3), select(shuffled[len(pool) // 2 :], 3)]  # two DDP ranks
        assert [e.path for e in select(halves[0] + halves[1], 3)] == expected


def test_fixed_sample_keeps_a_path_once():
    sample = FixedSample(per_label=3)
    for _ in range(2):  # a DDP sampler's padded repeat
        sample.offer(example("c/test/good/000.png"))
    assert [e.path for e in sample.examples] == ["c/test/good/000.png"]


# ----- a real `test` run through the CLI with the default callbacks --------------------------------
@pytest.fixture(scope="module")
def tested_run(tmp_path_factory):
    """fit 1 epoch + test on a tiny tree (heads with a map, with pixel decisions, without a map), with
    the default callbacks (VisualReport with 4 images of each label per category)."""
    tmp = tmp_path_factory.mktemp("visual")
    root = build_mvtec_tree(tmp / "data", n_train=20, n_test_good=4, defects={"scratch": 3, "hole": 2})
    args = ["--data", "MVTecAD", "--data.root", str(root), "--data.category", "widget", "--data.image_size", "64",
            "--data.train_batch_size", "8", "--model.denoiser", "tiny", "--model.heads", "likelihood,radar,iforest", "--model.latency_images", "0",
            "--trainer.logger.init_args.save_dir", str(tmp / "runs"),
            "--trainer.default_root_dir", str(tmp / "runs")]  # fmt: skip
    main(["fit", *args, "--trainer.max_epochs", "1"])
    main(["test", *args, "--ckpt_path", str(tmp / "runs")])
    return tmp / "runs" / "version_1"


@FIT_AND_TEST
def test_test_run_writes_heatmaps_histograms_and_roc(tested_run):
    plots = tested_run / "plots"
    names = {p.name for p in plots.iterdir()}
    assert {"heatmaps_likelihood_widget.png", "heatmaps_radar_widget.png", "score_histograms.png", "roc.png"} <= names
    assert not any("iforest" in n for n in names if n.startswith("heatmaps_"))  # no map, no heatmap
    for name in names - {"roc.csv", "heatmap_sample.csv"}:
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and min(image.size) > 100


@FIT_AND_TEST
def test_heatmap_sample_is_the_first_four_of_each_label(tested_run):
    with (tested_run / "plots" / "heatmap_sample.csv").open() as f:
        rows = list(csv.DictReader(f))
    paths = ["/".join(r["path"].split("/")[-2:]) for r in rows]
    anomalous = ["hole/000.png", "scratch/000.png", "hole/001.png", "scratch/001.png"]  # not scratch/002
    assert paths == anomalous + [f"good/{i:03d}.png" for i in range(4)]  # by (file name, path), anomalous first
    assert [int(r["label"]) for r in rows] == [1] * 4 + [0] * 4
    with (tested_run / "scores.csv").open() as f:
        scores = {r["path"]: float(r["likelihood"]) for r in csv.DictReader(f)}
    for row in rows:
        assert float(row["likelihood"]) == pytest.approx(scores[row["path"]], rel=1e-5)


@FIT_AND_TEST
def test_roc_points_give_the_reported_auroc(tested_run):
    metrics = json.loads((tested_run / "metrics.json").read_text())
    with (tested_run / "plots" / "roc.csv").open() as f:
        rows = list(csv.DictReader(f))
    heads = sorted({r["head"] for r in rows})
    assert heads == ["iforest", "likelihood", "radar"]  # head scores only, not their terms
    for head in heads:
        fpr = np.array([float(r["fpr"]) for r in rows if r["head"] == head])
        tpr = np.array([float(r["tpr"]) for r in rows if r["head"] == head])
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids under the ROC points
        assert area == pytest.approx(metrics["categories"]["widget"]["heads"][head]["image_auroc"], abs=1e-6)
