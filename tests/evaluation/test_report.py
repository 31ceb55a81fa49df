import torch

from ad_lightning.evaluation.report import build_metrics


def payload():
    rows = [{"path": f"{c}/{i}.png", "label": i % 2, "category": c} for c in ("a", "b") for i in range(4)]
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.5, 0.4, 0.6, 0.7])
    masks = torch.zeros(8, 4, 4, dtype=torch.bool)
    masks[1::2, 0] = True
    maps = masks.float() + 0.01 * torch.arange(8.0)[:, None, None]
    return {"rows": rows, "scores": {"h": scores, "h_t": -scores}, "maps": {"h": maps}, "masks": masks}


def test_per_category_then_mean_and_counts():
    m = build_metrics(payload(), {"h": "h", "h_t": "h"}, {"h": 2}, {"backbone": 1.0, "h": 2.0})
    assert m["n_test_images"] == 8 and m["n_anomalous"] == 4
    assert m["categories"]["a"]["heads"]["h"]["image_auroc"] == 1.0
    assert m["categories"]["b"]["heads"]["h"]["image_auroc"] == 0.5
    assert m["heads"]["h"]["image_auroc"] == 0.75 and m["heads"]["h_t"]["image_auroc"] == 0.25
    assert m["heads"]["h"]["pixel_auroc"] == 1.0 and "pixel_auroc" not in m["heads"]["h_t"]
    assert m["heads"]["h"]["nfe"] == m["heads"]["h_t"]["nfe"] == 2 and m["heads"]["h"]["ms_per_image"] == 3.0


def test_without_masks_the_run_is_image_level_and_says_so():
    m = build_metrics(payload(), {"h": "h", "h_t": "h"}, {"h": 2}, {}, has_masks=False)
    assert "pixel_auroc" not in m["heads"]["h"] and m["pixel_metrics"].startswith("none")


def test_full_metric_set_and_deployed_threshold_only_for_heads():
    m = build_metrics(payload(), {"h": "h", "h_t": "h"}, {"h": 2}, {}, thresholds={"h": 0.65})
    a = m["categories"]["a"]["heads"]["h"]
    assert a["image_ap"] == 1.0 and a["image_f1max"] == 1.0
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"]) == (1.0, 1.0, 1.0, 1.0)  # 0.9, 0.8 >= 0.65
    b = m["categories"]["b"]["heads"]["h"]  # only 0.7 >= 0.65, and it is anomalous
    assert (b["accuracy"], b["precision"], b["recall"]) == (0.75, 1.0, 0.5)
    assert "accuracy" not in m["heads"]["h_t"]  # a raw term has no deployed threshold
    assert {"pixel_ap", "pixel_f1max", "aupro"} <= set(m["heads"]["h"]) and m["heads"]["h"]["aupro"] == 1.0
    assert m["oracle_metrics"] == ["image_f1max", "pixel_f1max"]
