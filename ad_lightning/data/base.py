"""The dataset item and the DataModule that every dataset layout builds on.

A subclass only says where a category's samples are (`make_samples`); this base turns them into
train / normal-validation / test datasets and dataloaders, the same way for every layout.
"""

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from ad_lightning.features.backbone import Backbone
from ad_lightning.features.cache import (
    DiskCache,
    FeatureDataset,
    Mirrored,
    Shard,
    backbone_key,
    default_cache_dir,
    extract_features,
)
from ad_lightning.data.images import (
    IMAGE_EXTENSIONS,
    BadFileError,
    BadInputError,
    list_images,
    probe_image,
    read_image,
    read_mask,
)

NORMAL_DEFECT = "good"
MIN_HELD_OUT = 2  # normal images each side of a split at least: a normaliser or Gaussian needs two values
BAD_FILE_POLICIES = ("error", "skip")
FEATURE_CACHES = ("memory", "disk", "off")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image on disk and what is known about it."""

    image_path: Path
    label: int  # 0 normal, 1 anomalous
    mask_path: Path | None  # None for normal images (zero mask)
    category: str
    defect: str  # "good" for normal images


class AnomalyDataset(Dataset):
    """Loads `Sample`s as un-normalised tensors at `image_size`, or at native size when None
    (no augmentation)."""

    def __init__(self, samples: Sequence[Sample], image_size: int | None) -> None:
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        image = read_image(sample.image_path, self.image_size)  # [3, H, W] in [0, 1]
        if sample.mask_path is None:
            mask = image.new_zeros(1, *image.shape[-2:])
        else:
            mask = read_mask(sample.mask_path, self.image_size)
        return {
            "image": image,
            "mask": mask,  # [1, H, W] in {0, 1}
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "path": str(sample.image_path),
            "category": sample.category,
            "defect": sample.defect,
        }


def split_normal(
    samples: Sequence[Sample], category: str, val_fraction: float, seed: int, option: str = "val_fraction"
) -> tuple[list[Sample], list[Sample]]:
    """Seeded (kept, held-out) split of one category's normal images; `option` names the fraction's setting.

    The generator is seeded from `seed` and the category name (crc32, not Python's salted
    hash) and the samples are sorted first, so every process and machine draws the same split
    and a category's split does not depend on which other categories are loaded.
    """
    ordered = sorted(samples, key=lambda s: s.image_path)
    n_val = max(MIN_HELD_OUT, round(val_fraction * len(ordered)))
    if len(ordered) - n_val < MIN_HELD_OUT:
        raise BadInputError(
            f"category {category!r} has {len(ordered)} normal training image(s): too few to hold out {n_val} "
            f"(--data.{option} {val_fraction}, at least {MIN_HELD_OUT}) and train on at least {MIN_HELD_OUT}; "
            f"add normal images (at least {2 * MIN_HELD_OUT})"
        )
    if n_val > round(val_fraction * len(ordered)):
        log.warning(
            "category %r: --data.%s %s of %d normal images is %d; holding out %d, the fewest the heads' "
            "normalisers and thresholds can be fitted on", category, option, val_fraction, len(ordered),
            round(val_fraction * len(ordered)), n_val,
        )  # fmt: skip
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    is_val = np.zeros(len(ordered), dtype=bool)
    is_val[rng.permutation(len(ordered))[:n_val]] = True
    train = [s for s, v in zip(ordered, is_val) if not v]
    val = [s for s, v in zip(ordered, is_val) if v]
    return train, val


def check_test_masks(samples: Sequence[Sample]) -> None:
    """Fail in setup, not mid-test, when a sample's ground-truth mask file is missing."""
    for sample in samples:
        if sample.mask_path is not None and not sample.mask_path.is_file():
            raise FileNotFoundError(
                f"{sample.defect} image {sample.image_path} has no ground-truth mask at {sample.mask_path}; "
                f"add the mask there or remove the image"
            )


def check_mask_fits(sample: Sample, decode: bool) -> None:
    """Raise `BadFileError` when the sample's image or mask is unreadable or the mask is not its image's size.

    A ground-truth mask is drawn on its image's pixel grid; a mask of another size is a mis-paired,
    cropped or rescaled file, and resizing it would silently move the defect, so it is bad input.
    """
    width, height = probe_image(sample.image_path, decode)
    if sample.mask_path is None:
        return
    mask_width, mask_height = probe_image(sample.mask_path, decode)
    if (mask_width, mask_height) != (width, height):
        reason = f"mask is {mask_width}x{mask_height} but its image {sample.image_path} is {width}x{height}"
        fix = "fix or remove the pair (or set --data.on_bad_file skip)"
        raise BadFileError(f"mask {sample.mask_path}: {reason}; {fix}", sample.mask_path, reason)


def screen_samples(samples: Sequence[Sample], on_bad_file: str) -> tuple[list[Sample], list[tuple[str, str]]]:
    """(usable samples, [(path, reason)] of the ones left out) under the bad-file policy.

    "error" reads only the headers of masked samples (a wrong-size mask stops the run here;
    unreadable files stop it when read). "skip" decodes every file once, here at setup, so a bad
    file changes the datasets before any dataloader exists instead of failing mid-run.
    """
    if on_bad_file == "error":
        for sample in samples:
            if sample.mask_path is not None:
                check_mask_fits(sample, decode=False)
        return list(samples), []
    kept, skipped = [], []
    for sample in samples:
        try:
            check_mask_fits(sample, decode=True)
        except BadFileError as err:
            log.warning("skipping %s: %s", err.path, err.reason)
            skipped.append((str(err.path), err.reason))
        else:
            kept.append(sample)
    return kept, skipped


def gather_shards(part: Tensor, total: int, strategy) -> Tensor:
    """Every rank's `Shard` of a dataset's features, all-gathered back into dataset order: rank r's
    item j is item j * world + r. part [n_r, C, h, w] (n_r = n_max or n_max - 1) -> [total, C, h, w] on the CPU."""
    world = strategy.world_size
    n_max = -(-total // world)
    padded = part.new_zeros(n_max, *part.shape[1:])
    padded[: len(part)] = part
    gathered = strategy.all_gather(padded.to(strategy.root_device)).cpu()  # [world, n_max, C, h, w]
    return gathered.transpose(0, 1).flatten(0, 1)[:total]  # [n_max, world, ...] -> [n_max * world, ...] -> [total, ...]


class AnomalyDataModule(lightning.LightningDataModule):
    """Base: subclasses only say where the samples are."""

    CATEGORIES: tuple[str, ...] = ()
    CATEGORY_DIRS = True  # each category is a directory under root (not for a layout of plain folders)
    DATA_HINT = "check --data.root"  # how to get the data; subclasses name the download and layout

    def __init__(
        self,
        root: str | Path,
        category: str | list[str] = "all",
        image_size: int = 256,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        on_bad_file: str = "error",
        feature_cache: str = "memory",
        cache_dir: str | None = None,
        hflip: bool = False,
        head_fit_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if feature_cache not in FEATURE_CACHES:
            raise BadInputError(
                f"feature_cache={feature_cache!r} is not one of {FEATURE_CACHES}; set --data.feature_cache"
            )
        if cache_dir is not None and feature_cache != "disk":
            raise BadInputError(
                f"cache_dir={cache_dir!r} is only used by the disk feature cache; add --data.feature_cache disk "
                "or drop --data.cache_dir"
            )
        if on_bad_file not in BAD_FILE_POLICIES:
            raise BadInputError(
                f"on_bad_file={on_bad_file!r} is not one of {BAD_FILE_POLICIES}; set --data.on_bad_file"
            )
        if not 0.0 < val_fraction < 1.0:
            raise BadInputError(f"val_fraction={val_fraction} must be in (0, 1); set --data.val_fraction, e.g. 0.1")
        if not 0.0 <= head_fit_fraction < 1.0:
            raise BadInputError(
                f"head_fit_fraction={head_fit_fraction} must be in [0, 1) (0: the heads fit on the denoiser's own "
                "training images); set --data.head_fit_fraction"
            )
        sizes = {"image_size": image_size, "train_batch_size": train_batch_size, "eval_batch_size": eval_batch_size}
        for name, value in sizes.items():
            if value < 1:
                raise BadInputError(f"{name}={value} must be a positive integer; set --data.{name}")
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.category = category
        self.image_size = image_size
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.on_bad_file = on_bad_file
        self.feature_cache = feature_cache
        self.cache_dir = cache_dir
        self.hflip = hflip
        self.head_fit_fraction = head_fit_fraction
        self.head_dataset: Dataset | None = None  # normal images held out of training to fit the heads on, if any
        self.head_features: Tensor | None = None  # the features the heads are fitted on (set by cache_features)
        self.skipped: list[tuple[str, str]] = []  # (path, reason) of files left out under on_bad_file="skip"
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._unchecked_test: list[Sample] = []  # test samples whose masks `check_test_split` has yet to check
        self.feature_sets: dict[str, Dataset] = {}  # split -> what its loader serves instead of plain images
        self.encoded: dict[str, int] = {}  # images this process ran the backbone on, per feature set (DDP: its shard)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def has_masks(self) -> bool:
        """Whether every anomalous test image has a pixel mask; False means image-level metrics only."""
        return True

    @property
    def categories(self) -> list[str]:
        """The categories to load: one name, a list, or "all" (CATEGORIES, else the sub-directories of root)."""
        if self.category == "all":
            return list(self.CATEGORIES) or self._discover_categories()
        names = [n.strip() for n in (self.category.split(",") if isinstance(self.category, str) else self.category)]
        # a category is a directory under root (a custom set in the same layout counts too)
        found = self.root.is_dir() and self.CATEGORY_DIRS
        unknown = [n for n in names if not n or (found and not (self.root / n).is_dir())]
        if unknown or not names:
            there = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")) if found else []
            valid = f"the folders there: {', '.join(there)}" if there else f"{type(self).__name__}'s: {', '.join(self.CATEGORIES)}"
            raise BadInputError(
                f"unknown category {unknown or names} for {type(self).__name__}: no such folder under {self.root}; "
                f"set --data.category to one or more of {valid}, or 'all' ({self.DATA_HINT})"
            )
        return names

    def _discover_categories(self) -> list[str]:
        """Sub-directories of root, sorted, hidden ones skipped."""
        self.check_root()
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise BadInputError(f"no category directories under data root {self.root}; {self.DATA_HINT}")
        return found

    def check_root(self) -> None:
        """Fail early, naming the root and how to get the data, when root is not a directory."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} does not exist; check --data.root. {self.DATA_HINT}")

    def require_dir(self, directory: Path) -> Path:
        """`directory`, failing with its name and how to get the data when it does not exist."""
        if not directory.is_dir():
            raise FileNotFoundError(f"expected directory {directory} does not exist; {self.DATA_HINT}")
        return directory

    def require_images(self, directory: Path) -> list[Path]:
        """`list_images(directory)`, failing with the directory's name when it is missing or empty."""
        images = list_images(self.require_dir(directory))
        if not images:
            raise BadInputError(
                f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {directory}; {self.DATA_HINT}"
            )
        return images

    def make_samples(self, category: str) -> tuple[list[Sample], list[Sample]]:
        """(normal training samples, test samples) of one category; each layout implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_samples(category)")

    def setup(self, stage: str | None = None) -> None:
        """Build the train, normal-validation and test datasets once (later calls do nothing)."""
        if self.test_dataset is not None:
            return
        self.check_root()
        train, val, test, head = [], [], [], []
        for category in self.categories:
            train_good, test_samples = self.make_samples(category)
            train_good = self._screen(train_good)
            if self.on_bad_file == "skip":  # a bad or missing mask leaves its image out, listed in metrics.json
                test_samples = self._screen(test_samples)
            category_train, category_val = split_normal(train_good, category, self.val_fraction, self.seed)
            if self.head_fit_fraction > 0:  # the heads fit on normal images the denoiser never trained on
                category_train, category_head = split_normal(
                    category_train, category, self.head_fit_fraction, self.seed + 1, option="head_fit_fraction"
                )
                head += category_head
            train += category_train
            val += category_val
            test += test_samples
        self.head_dataset = self.make_dataset(head, "train") if head else None
        self.train_dataset = self.make_dataset(train, "train")
        self.val_dataset = self.make_dataset(val, "val")
        self.test_dataset = self.make_dataset(test, "test")
        self._unchecked_test = test if self.on_bad_file == "error" else []

    def check_test_split(self) -> None:
        """Stop on a missing, unreadable or mis-sized test mask before anything is scored: checked when the
        test split is first asked for, not in setup, so `fit` (which never reads test masks) is not stopped."""
        samples, self._unchecked_test = self._unchecked_test, []
        check_test_masks(samples)
        screen_samples(samples, "error")

    def _screen(self, samples: list[Sample]) -> list[Sample]:
        kept, skipped = screen_samples(samples, self.on_bad_file)
        self.skipped += skipped
        return kept

    def make_dataset(self, samples: list[Sample], split: str) -> Dataset:
        """The dataset of one split ("train", "val", "test"); a layout may serve other items (tiles)."""
        return AnomalyDataset(samples, self.image_size)

    def val_images(self) -> Tensor | None:
        """Which validation image each validation item comes from, when the items are parts (tiles) of
        images, as indices [N]; None when every item is a whole image."""
        return None

    @property
    def tiling(self) -> tuple[int, int] | None:
        """(tile size, overlap) when test images are scored tile by tile at native size, else None."""
        return None

    def cache_features(self, backbone: Backbone, device: torch.device | str = "cpu") -> Tensor:
        """Run the frozen `backbone` over the train and validation images once (`feature_cache`
        "memory"), or only over the items the disk cache lacks ("disk").

        From then on the train and validation loaders serve `{"features": [C, h, w]}` items instead
        of images, so training never pays for the backbone again. With "off" they keep serving
        images (the backbone runs every step, for speed comparisons) and only the training features
        are computed, for the statistics. With `hflip` the training set is the N items followed by
        their N mirrored copies, features computed on flipped images: a fixed set, so the order of
        every epoch is the sampler's (seed, epoch) draw alone and a resumed run replays it. Returns
        the training features of the unmirrored images [N, C, h, w] (the feature statistics); the features
        the heads fit on are `head_features` (the same, or with `head_fit_fraction`, images held out of
        training).

        Under DDP each rank encodes only its shard of each split (every world-th image) and the shards
        are all-gathered, so every rank ends with the same tensors in dataset order (`encoded` counts
        what this rank encoded itself).
        """
        self.setup("fit")
        store = None
        if self.feature_cache == "disk":
            store = DiskCache(self.cache_dir or default_cache_dir(), backbone_key(backbone, self.image_size))
        extract = extract_features if store is None else store.extract
        world, rank = self._world()

        def features(dataset: Dataset, desc: str) -> Tensor:
            if world == 1 or len(dataset) < world:  # too few items to share: every rank encodes them all
                self.encoded[desc] = len(dataset)
                return extract(backbone, dataset, self.eval_batch_size, device, self.num_workers, desc=desc)
            shard = Shard(dataset, rank, world)
            self.encoded[desc] = len(shard)
            part = extract(backbone, shard, self.eval_batch_size, device, self.num_workers, desc=desc)
            print(f"{desc}: rank {rank} of {world} encoded {len(shard)} of {len(dataset)} images")
            return gather_shards(part, len(dataset), self.trainer.strategy)

        train = features(self.train_dataset, "train features")
        self.head_features = train if self.head_dataset is None else features(self.head_dataset, "head-fit features")
        if self.feature_cache == "off":
            mirrored = Mirrored(self.train_dataset)
            self.feature_sets = {"train": ConcatDataset([self.train_dataset, mirrored])} if self.hflip else {}
            return train
        train_set = FeatureDataset(train)
        if self.hflip:
            mirrored = FeatureDataset(features(Mirrored(self.train_dataset), "mirrored train features"))
            train_set = ConcatDataset([train_set, mirrored])
        self.feature_sets = {"train": train_set, "val": FeatureDataset(features(self.val_dataset, "val features"))}
        return train

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) of the trainer this datamodule is attached to; (1, 0) without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self._epoch_sampler(dataset) if shuffle else None,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _epoch_sampler(self, dataset: Dataset) -> DistributedSampler:
        """Training order: a permutation drawn from (seed, epoch) alone, sharded over the ranks.

        The trainer sets the epoch, so a run resumed from a checkpoint replays the order of the
        uninterrupted run (a plain shuffle draws from the global RNG, which no checkpoint holds).
        """
        world, rank = self._world()
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.feature_sets.get("train", self.train_dataset), self.train_batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.feature_sets.get("val", self.val_dataset), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.check_test_split()
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
