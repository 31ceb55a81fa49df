"""`export` to ONNX and `predict` with the exported file: parity with the eager model on demo images."""

import csv
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from ad_lightning import Detector, export
from ad_lightning.cli import main
from ad_lightning.data import MVTecAD
from ad_lightning.data.demo import ensure_demo
from ad_lightning.data.images import BadInputError, list_images, read_image
from ad_lightning.errors import UsageError
from ad_lightning.heads import HeadOutput
from ad_lightning.inference import OnnxScorer, load_model
from ad_lightning.lit import FeatureDDPM

pytestmark = pytest.mark.usefixtures("raw_errors")  # input errors raised, not printed

IMAGE_SIZE = 256  # the demo images' size, and the size the model is trained and exported at
HEADS = ["likelihood", "irf"]
TOLERANCE = 1e-4  # the acceptance: max |exported - eager| of scores and maps


# Tests of the trained and exported model: fit + 2 exports, 1.5 to 2 min on the shared 2-core CPU.
USES_THE_EXPORTED_MODEL = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A small demo set (MVTec layout): 40 normal training images, 3 normal and 5 defective test images."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    return ensure_demo(root, categories=("fabric",), n_train=40, n_test_good=3, n_per_defect=1)


@pytest.fixture(scope="module")
def ckpt(demo, tmp_path_factory) -> Path:
    """A tiny model with pretrained Lite0, trained for 2 epochs on the demo images, both heads fitted.

    10 normal validation images and a fast learning rate keep the likelihood normalisers' ranges
    realistic: fitted on 2 images of a barely trained network they are ~1e-3 wide and blow float32
    rounding up to 1e-4 in the score."""
    runs = tmp_path_factory.mktemp("fit") / "runs"
    data = ["--data", "MVTecAD", "--data.root", str(demo), "--data.category", "fabric", "--data.val_fraction", "0.25"]
    logs = ["--trainer.logger.init_args.save_dir", str(runs), "--trainer.default_root_dir", str(runs)]
    main(["fit", *data, "--data.image_size", str(IMAGE_SIZE), "--data.train_batch_size", "8", "--model.denoiser", "tiny",
          "--model.heads", ",".join(HEADS), "--model.lr", "3e-3", "--model.warmup_steps", "1",
          "--trainer.max_epochs", "2", *logs])  # fmt: skip
    return runs / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def exported(ckpt) -> dict[str, Path]:
    """Each head exported through the CLI to the default path beside the checkpoint."""
    for head in HEADS:
        with pytest.raises(SystemExit) as info:
            main(["export", "--ckpt_path", str(ckpt), "--head", head])
        assert info.value.code == 0
    return {head: ckpt.with_name(f"last_{head}.onnx") for head in HEADS}


@pytest.fixture(scope="module")
def test_images(demo) -> torch.Tensor:
    """Every test image of the small demo set (5 defect types, one image each, and 3 normal): [8, 3, 256, 256]."""
    folder = demo / "fabric" / "test"
    paths = [p for kind in sorted(folder.iterdir()) for p in list_images(kind)]
    return torch.stack([read_image(p, IMAGE_SIZE) for p in paths])


@USES_THE_EXPORTED_MODEL
@pytest.mark.parametrize("head", HEADS)
def test_exported_scores_and_maps_match_the_eager_model_on_demo_images(ckpt, exported, test_images, demo, head):
    model, _ = load_model(str(ckpt), torch.device("cpu"))
    eager = model.score_batch(test_images, heads=[head])[head]
    scorer = OnnxScorer.open(exported[head])
    onnx_scores = scorer(test_images)
    assert eager.score.std() > 0  # a real comparison: the images score differently
    assert (onnx_scores.score - eager.score).abs().max() <= TOLERANCE
    assert onnx_scores.maps.shape == eager.maps.shape == (8, IMAGE_SIZE, IMAGE_SIZE)
    assert (onnx_scores.maps - eager.maps).abs().max() <= TOLERANCE
    one = scorer(test_images[3:4])  # the batch axis is dynamic: one image scores as in the batch
    assert (one.score - onnx_scores.score[3:4]).abs().max() <= TOLERANCE

    # what predict needs rides along in the metadata: the deployed threshold is the 99th percentile of the
    # normal validation images' scores, the map range their feature-grid maps' extremes, both recomputed here
    fitted, validation = model.heads[head], validation_images(demo)
    with torch.no_grad():
        normal, maps = fitted.score(fitted.evaluate(model.encode(validation), model.eps_fn, model.alpha_bar))
    assert (scorer.head, scorer.image_size) == (head, IMAGE_SIZE) and len(validation) == 10
    assert scorer.threshold == pytest.approx(float(np.percentile(normal.double().numpy(), 99)), rel=1e-4)
    assert scorer.map_range == pytest.approx((float(maps.min()), float(maps.max())), rel=1e-4)


def validation_images(demo: Path) -> torch.Tensor:
    """The normal validation split the `ckpt` fixture's model was calibrated on: [10, 3, 256, 256]."""
    data = MVTecAD(demo, "fabric", image_size=IMAGE_SIZE, val_fraction=0.25)
    data.setup()
    return torch.stack([item["image"] for item in data.val_dataset])


def predict_rows(model_path: Path, head: str, images: Path, out: Path) -> list[dict]:
    with pytest.raises(SystemExit) as info:
        main(["predict", "--ckpt_path", str(model_path), "--head", head, "--data.path", str(images), "--out", str(out)])
    assert info.value.code == 0
    with (out / "predictions.csv").open() as f:
        return list(csv.DictReader(f))


@USES_THE_EXPORTED_MODEL
@pytest.mark.parametrize("head", HEADS)
def test_predict_with_the_exported_file_gives_the_checkpoint_scores(ckpt, exported, demo, head, tmp_path):
    images = demo / "fabric" / "test"
    from_ckpt = predict_rows(ckpt, head, images, tmp_path / "ckpt")
    from_onnx = predict_rows(exported[head], head, images, tmp_path / "onnx")
    assert [r["path"] for r in from_onnx] == [r["path"] for r in from_ckpt] and len(from_ckpt) == 8
    for a, b in zip(from_onnx, from_ckpt):
        assert abs(float(a["score"]) - float(b["score"])) <= TOLERANCE
        assert a["decision"] == b["decision"] and Path(a["overlay"]).is_file()


def test_export_refuses_a_head_without_a_graph():
    with pytest.raises(UsageError, match=r"head 'reconstruction' cannot be exported.*heads: likelihood, irf"):
        main(["export", "--ckpt_path", "runs", "--head", "reconstruction"])


@USES_THE_EXPORTED_MODEL
def test_predict_refuses_another_head_or_size_than_exported(exported, demo, tmp_path):
    args = ["predict", "--ckpt_path", str(exported["irf"]), "--data.path", str(demo / "fabric" / "test"),
            "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(UsageError, match=r"scores head 'irf', not 'likelihood'; drop --head"):
        main([*args, "--head", "likelihood"])
    with pytest.raises(UsageError, match=r"exported for 256 x 256 images, not 128"):
        main([*args, "--head", "irf", "--image_size", "128"])


def test_a_failed_check_leaves_no_file_behind(tmp_path, monkeypatch):
    """The graph is written and opened, then the comparison with the eager model fails: the export is
    refused and neither the file nor its partial copy remains."""
    model = FeatureDDPM(pretrained=False, heads="likelihood").eval()
    model.feature_norm.fit(torch.randn(4, model.backbone.out_channels, 2, 2))
    head = model.heads["likelihood"]
    head.calibrate(HeadOutput({"nll": torch.arange(12.0), "sp": torch.arange(12.0)}, torch.rand(12, 2, 2)))
    seen = []

    def failing_compare(graph, scorer, images):
        seen.extend(sorted(p.name for p in tmp_path.iterdir()))  # what was on disk while checking
        raise RuntimeError("the exported likelihood graph differs from the eager model")

    monkeypatch.setattr(export, "compare", failing_compare)
    with pytest.raises(RuntimeError, match="differs from the eager model"):
        export.export_onnx(model, "likelihood", tmp_path / "likelihood.onnx", image_size=32)
    assert len(seen) == 1 and seen[0].startswith(".likelihood.onnx.") and seen[0].endswith(".partial")
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_file_without_our_metadata_is_refused(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["score"])], "other",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [1])],
    )  # fmt: skip
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    with pytest.raises(BadInputError, match="not an ad_lightning scoring export"):
        OnnxScorer.open(path)


@USES_THE_EXPORTED_MODEL
def test_the_python_api_scores_as_test_does_from_the_checkpoint_and_the_export(ckpt, exported, demo, tmp_path):
    """`Detector` on the checkpoint gives test's scores.csv within 1e-5, on the export within 1e-4; its maps
    are H x W at the image size and its decisions the deployed threshold's."""
    runs = tmp_path / "runs"
    main(["test", "--ckpt_path", str(ckpt), "--data.root", str(demo), "--model.latency_images", "0",
          "--trainer.logger.init_args.save_dir", str(runs), "--trainer.default_root_dir", str(runs)])  # fmt: skip
    with next(runs.rglob("scores.csv")).open() as f:
        tested = {row["path"]: row for row in csv.DictReader(f)}
    paths = list(tested)
    for head in HEADS:
        for source, tolerance in ((ckpt, 1e-5), (exported[head], 1e-4)):
            detector = Detector.from_checkpoint(source, head=None if source.suffix == ".onnx" else head)
            results = detector.predict(paths, batch_size=32)  # test's batch: the 8 test images at once
            assert detector.head == head and len(results) == len(paths)
            for path, result in zip(paths, results):
                expected = float(tested[path][head])
                assert abs(result.score - expected) <= tolerance * max(1.0, abs(expected)), (head, source.name, path)
                assert result.anomaly_map.shape == (IMAGE_SIZE, IMAGE_SIZE)
                assert result.is_anomalous == (result.score >= detector.threshold)
    # the other inputs the API takes give the same scores as paths
    detector = Detector.from_checkpoint(ckpt, head="irf")
    images = [read_image(Path(p), IMAGE_SIZE) for p in paths[:2]]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:2]]
    from_paths = [r.score for r in detector.predict(paths[:2])]
    assert [r.score for r in detector.predict(torch.stack(images))] == pytest.approx(from_paths, abs=1e-6)
    assert [r.score for r in detector.predict(arrays)] == pytest.approx(from_paths, abs=1e-6)
    assert [r.score for r in detector.predict([Image.open(p) for p in paths[:2]])] == pytest.approx(from_paths, abs=1e-6)
