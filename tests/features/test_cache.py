"""Feature cache: the memory and disk paths serve the backbone's own features; per-file invalidation,
configuration keys, damaged and half-written entries, hflip, and `feature_cache: off`."""

import copy
import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_WIDGET
from huggingface_hub import constants as hf_constants
from torch import Tensor

from ad_lightning.cli import main
from ad_lightning.data import MVTecAD
from ad_lightning.data.base import AnomalyDataset
from ad_lightning.data.images import BadInputError, read_image
from ad_lightning.data.printed3d import Printed3D
from ad_lightning.features.backbone import Backbone
from ad_lightning.features.cache import (
    DiskCache,
    backbone_key,
    default_cache_dir,
    extract_features,
    item_sources,
    state_digest,
)
from ad_lightning.lit import FeatureDDPM

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "bench_train_cache.py"
SIZE = 32
BATCH = 4
TINY = [*TINY_WIDGET, "--model.heads", "likelihood"]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """The packaged Lite0 weights, without probing the Hugging Face hub first."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def backbone(offline):
    return Backbone()


@pytest.fixture
def encoded(backbone):
    """Batch sizes of every backbone forward while the test runs (sum = images encoded)."""
    sizes = []
    handle = backbone.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    yield sizes
    handle.remove()


@pytest.fixture
def root(tmp_path, make_mvtec_tree):
    return make_mvtec_tree(tmp_path / "data", n_train=7, n_test_good=1, defects={"scratch": 1})  # 5 train, 2 val


def module(root, image_size: int = SIZE, **kwargs) -> MVTecAD:
    return MVTecAD(root, "widget", image_size=image_size, eval_batch_size=BATCH, **kwargs)


def on_disk(root, tmp_path, **kwargs) -> MVTecAD:
    return module(root, feature_cache="disk", cache_dir=str(tmp_path / "cache"), **kwargs)


def store_of(tmp_path, backbone) -> DiskCache:
    return DiskCache(tmp_path / "cache", backbone_key(backbone, SIZE))


def served(dataset) -> Tensor:
    return torch.stack([item["features"] for item in dataset])  # N x [C, h, w] -> [N, C, h, w]


def n_items(datamodule) -> int:
    return len(datamodule.train_dataset) + len(datamodule.val_dataset)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_served_features_are_the_backbones_own(root, tmp_path, backbone, encoded, mode):
    kwargs = {"cache_dir": str(tmp_path / "cache")} if mode == "disk" else {}
    first = module(root, feature_cache=mode, **kwargs)
    train = first.cache_features(backbone)
    fresh = extract_features(backbone, first.train_dataset, BATCH)
    assert torch.equal(train, fresh) and torch.equal(served(first.feature_sets["train"]), fresh)
    assert torch.equal(served(first.feature_sets["val"]), extract_features(backbone, first.val_dataset, BATCH))
    encoded.clear()
    again = module(root, feature_cache=mode, **kwargs)
    assert torch.equal(again.cache_features(backbone), fresh)
    assert sum(encoded) == (0 if mode == "disk" else n_items(again))  # disk: all hits; memory: a new process


@pytest.mark.parametrize("change", ["touch", "rewrite"])
def test_a_changed_file_invalidates_exactly_its_entry(root, tmp_path, backbone, encoded, write_image_file, change):
    before = on_disk(root, tmp_path).cache_features(backbone)
    datamodule = on_disk(root, tmp_path)
    datamodule.setup("fit")
    changed = datamodule.train_dataset.samples[2].image_path
    if change == "touch":
        stat = changed.stat()
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:
        write_image_file(changed, seed=99)
    encoded.clear()
    after = datamodule.cache_features(backbone)
    assert encoded == [1]  # that image alone
    assert torch.equal(after[2], backbone(read_image(changed, SIZE)[None])[0])  # [3, S, S] -> [1, 3, S, S]
    assert torch.equal(after[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    assert torch.allclose(after[2], before[2], atol=1e-4) == (change == "touch")
    encoded.clear()
    assert torch.equal(on_disk(root, tmp_path).cache_features(backbone), after) and encoded == []


def test_the_key_changes_with_the_stages_grid_weights_and_image_size(tmp_path, backbone):
    same_modules = Backbone(out_indices=(1, 3))  # the same layers as (2, 3): only the fused stages differ
    finer = copy.deepcopy(backbone)
    finer.grid = "finest"  # the same weights and stages, fused at stride 8
    assert state_digest(same_modules) == state_digest(backbone) == state_digest(finer)
    nudged = copy.deepcopy(backbone)
    with torch.no_grad():
        next(nudged.parameters()).add_(1e-3)
    directory = lambda b, size=SIZE: DiskCache(tmp_path, backbone_key(b, size)).dir  # noqa: E731
    directories = [directory(b) for b in (backbone, same_modules, nudged, finer)] + [directory(backbone, 64)]
    assert len(set(directories)) == 5 and directory(backbone) == directories[0]


def test_another_configuration_never_reads_these_entries(root, tmp_path, backbone, encoded):
    on_disk(root, tmp_path).cache_features(backbone)
    encoded.clear()
    other = on_disk(root, tmp_path, image_size=64)
    other.cache_features(backbone)
    assert sum(encoded) == n_items(other) and len(list((tmp_path / "cache").iterdir())) == 2


def test_damaged_entries_are_recomputed_with_a_warning(root, tmp_path, backbone, encoded, caplog):
    datamodule = on_disk(root, tmp_path)
    before = datamodule.cache_features(backbone)
    sources = item_sources(datamodule.train_dataset)
    garbage, truncated = (store_of(tmp_path, backbone).entry_path(s) for s in sources[:2])
    garbage.write_bytes(b"not a torch file")
    truncated.write_bytes(truncated.read_bytes()[:100])
    encoded.clear()
    with caplog.at_level(logging.WARNING):
        after = on_disk(root, tmp_path).cache_features(backbone)
    assert encoded == [2] and torch.allclose(after, before, atol=1e-4)
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 2 and str(garbage) in warnings[0] and str(truncated) in warnings[1]


class Payload:
    """Pickles as a call to os.mkdir: loading it without weights_only would create `marker`."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_entries_are_loaded_with_weights_only(root, tmp_path, backbone, encoded):
    datamodule = on_disk(root, tmp_path)
    before = datamodule.cache_features(backbone)
    source = item_sources(datamodule.train_dataset)[0]
    marker = tmp_path / "code_ran"
    entry = {"source": source.as_list(), "stamp": list(source.stamp()), "features": Payload(marker)}
    torch.save(entry, store_of(tmp_path, backbone).entry_path(source))
    encoded.clear()
    after = on_disk(root, tmp_path).cache_features(backbone)
    assert not marker.exists() and encoded == [1] and torch.allclose(after, before, atol=1e-4)


def test_an_interrupted_write_leaves_no_entry(root, tmp_path, backbone, encoded, monkeypatch):
    def killed(entry, file):
        file.write(b"half an entry")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            on_disk(root, tmp_path).cache_features(backbone)
    assert [p.name for p in store_of(tmp_path, backbone).dir.iterdir()] == ["key.json"]
    encoded.clear()
    datamodule = on_disk(root, tmp_path)
    datamodule.cache_features(backbone)
    assert sum(encoded) == n_items(datamodule)


def test_hflip_serves_each_item_then_the_features_of_its_flipped_image(root, backbone):
    datamodule = module(root, hflip=True)
    train = datamodule.cache_features(backbone)
    features = served(datamodule.feature_sets["train"])
    n = len(datamodule.train_dataset)
    assert features.shape[0] == 2 * n and torch.equal(features[:n], train)
    images = torch.stack([item["image"] for item in datamodule.train_dataset])  # [N, 3, S, S]
    assert torch.allclose(features[n:], backbone(images.flip(-1)), atol=1e-4)
    assert not torch.allclose(features[n:], train.flip(-1), atol=1e-2)  # mirrored feature maps would be wrong


def test_hflip_training_order_is_fixed_by_seed_and_epoch(root, backbone):
    def epoch(number: int, seed: int = 0) -> Tensor:
        datamodule = module(root, hflip=True, train_batch_size=3, seed=seed)
        datamodule.cache_features(backbone)
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(number)  # what the trainer does at every epoch start
        return torch.cat([batch["features"] for batch in loader])

    first = epoch(1)
    assert torch.equal(first, epoch(1)) and not torch.equal(first, epoch(2))


def test_hflip_mirrors_are_cached_on_disk_too(root, tmp_path, backbone, encoded):
    first = on_disk(root, tmp_path, hflip=True)
    first.cache_features(backbone)
    n_train = len(first.train_dataset)
    assert len(list(store_of(tmp_path, backbone).dir.glob("*.pt"))) == n_items(first) + n_train
    encoded.clear()
    again = on_disk(root, tmp_path, hflip=True)
    again.cache_features(backbone)
    assert encoded == [] and torch.equal(served(again.feature_sets["train"]), served(first.feature_sets["train"]))


def test_tiles_are_entries_of_their_own(tmp_path, backbone, encoded, write_image_file):
    parts = tmp_path / "parts"
    for i in range(5):
        write_image_file(parts / "gear/train/good" / f"{i}.png", seed=i, size=80)
    write_image_file(parts / "gear/test/good/0.png", seed=50)
    kwargs = {"image_size": SIZE, "val_fraction": 0.4, "tile_size": 48, "tile_overlap": 8, "eval_batch_size": BATCH}
    kwargs |= {"feature_cache": "disk", "cache_dir": str(tmp_path / "cache")}
    make = lambda: Printed3D(parts, "gear", **kwargs)  # noqa: E731
    datamodule = make()
    train = datamodule.cache_features(backbone)
    assert torch.equal(train, extract_features(backbone, datamodule.train_dataset, BATCH))
    assert len(list(store_of(tmp_path, backbone).dir.glob("*.pt"))) == n_items(datamodule) == 5 * 4  # 4 tiles each of 3 train, 2 val images
    touched = datamodule.train_dataset.samples[0].image_path
    os.utime(touched, ns=(0, touched.stat().st_mtime_ns + 10**9))
    encoded.clear()
    assert torch.allclose(make().cache_features(backbone), train, atol=1e-4) and encoded == [4]


def test_off_serves_images_and_computes_only_the_training_features(root, backbone, encoded):
    datamodule = module(root, feature_cache="off")
    train = datamodule.cache_features(backbone)
    assert sum(encoded) == len(datamodule.train_dataset)
    assert torch.equal(train, extract_features(backbone, datamodule.train_dataset, BATCH))
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        batch = next(iter(loader))
        assert "image" in batch and "features" not in batch


def test_off_with_hflip_serves_each_image_then_its_mirror(root, backbone):
    datamodule = module(root, feature_cache="off", hflip=True)
    datamodule.cache_features(backbone)
    served_images = datamodule.feature_sets["train"]
    n = len(datamodule.train_dataset)
    assert len(served_images) == 2 * n
    for i, item in enumerate(datamodule.train_dataset):
        assert torch.equal(served_images[n + i]["image"], item["image"].flip(-1))


def test_bad_cache_settings_name_the_option(root):
    with pytest.raises(BadInputError, match="--data.feature_cache"):
        module(root, feature_cache="ram")
    with pytest.raises(BadInputError, match="--data.cache_dir"):
        module(root, cache_dir="somewhere")


def test_default_directory_follows_the_environment(root, tmp_path, backbone, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AD_LIGHTNING_CACHE", raising=False)
    assert default_cache_dir() == tmp_path / "home/.cache/ad_lightning/features"
    monkeypatch.setenv("AD_LIGHTNING_CACHE", str(tmp_path / "env"))
    module(root, feature_cache="disk").cache_features(backbone)
    written = [p.parent.name for p in (tmp_path / "env/features").glob("*/key.json")]
    assert written == [store_of(tmp_path, backbone).dir.name]


@pytest.mark.parametrize("mode", ["memory", "off"])
def test_benchmark_times_epochs_that_differ_only_in_the_cache(root, mode):
    spec = importlib.util.spec_from_file_location("bench_train_cache", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    datamodule = module(root, feature_cache=mode, train_batch_size=BATCH, image_size=64)  # the UNet needs 4 x 4 features
    model = FeatureDDPM(heads="likelihood", latency_images=0)
    encoded = []
    model.backbone.register_forward_hook(lambda module, args, output: encoded.append(args[0].shape[0]))
    timer = bench.time_epochs(datamodule, epochs=2, model=model)
    n_train, n_val = len(datamodule.train_dataset), len(datamodule.val_dataset)
    assert len(timer.wall) == len(timer.cpu) == 2 and min(timer.wall + timer.cpu) > 0
    # the setup pass; when off, also 2 epochs of training images and the heads' validation pass at the end
    assert sum(encoded) == (n_train + n_val if mode == "memory" else 3 * n_train + n_val)


@pytest.fixture
def cli_tree(tmp_path, make_mvtec_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ is written relative to the working directory
    return make_mvtec_tree(tmp_path / "data", n_train=20, n_test_good=4)  # 18 train, 2 val


@pytest.fixture
def images_read(monkeypatch):
    """Indices of every image item read from disk while the test runs."""
    seen = []
    original = AnomalyDataset.__getitem__
    monkeypatch.setattr(AnomalyDataset, "__getitem__", lambda self, i: seen.append(i) or original(self, i))
    return seen


def test_fit_with_the_cache_off_reads_the_images_every_epoch(cli_tree, tmp_path, images_read):
    main(["fit", *TINY, "--data.root", str(cli_tree), "--data.feature_cache", "off", "--trainer.max_epochs", "1"])
    n_train, n_val = 18, 2
    # the statistics pass, the epoch's images, then the validation images the heads are calibrated on
    assert len(images_read) == n_train + (n_train + n_val) + n_val
    assert (tmp_path / "runs/version_0/checkpoints/last.ckpt").is_file()


def test_fit_with_the_disk_cache_reads_no_image_the_second_time(cli_tree, tmp_path, images_read):
    cache_dir = tmp_path / "feature_cache"
    args = ["fit", *TINY, "--data.root", str(cli_tree), "--data.feature_cache", "disk"]
    args += ["--data.cache_dir", str(cache_dir), "--trainer.fast_dev_run", "true"]
    main(args)
    assert len(images_read) == 20 and len(list(cache_dir.glob("*/*.pt"))) == 20
    images_read.clear()
    main(args)
    assert images_read == []
