"""Backbone features of a dataset, computed once: kept in memory, or in an on-disk cache that outlives the process.

The backbone is frozen, so training does not need to run it every step: the DataModule serves
these tensors instead of images (see `AnomalyDataModule.cache_features`).

The disk cache (`--data.feature_cache disk`) has one directory per backbone configuration (see
`backbone_key`) and one entry file per item: an image, a tile of one (its box), or either of them
mirrored. An entry records the file's mtime and size when it was computed, so a touched or rewritten
file invalidates exactly its own entries. Entries are written atomically (temporary file, then
`os.replace`) and read with `torch.load(weights_only=True)`; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ad_lightning.checkpoint import atomic_write

if TYPE_CHECKING:
    from ad_lightning.data.tiling import Box
    from ad_lightning.features.backbone import Backbone

CACHE_VERSION = 1  # bump when images -> features changes (reading, resizing, fusing): old entries are never read
KEY_FILE = "key.json"  # what a configuration directory holds, for people clearing the cache
NOT_HASHED = ("weights_source",)  # recorded in key.json for people; the weights digest identifies the weights
log = logging.getLogger(__name__)

Stamp = tuple[int, int]  # (mtime_ns, size) of an image file


@torch.inference_mode()
def extract_features(
    encode: Callable[[Tensor], Tensor],
    dataset: Dataset,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "features",
) -> Tensor:
    """Run `encode` over every image of `dataset` in order -> float32 CPU tensor [N, C, h, w]."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks = [encode(batch["image"].to(device)).float().cpu() for batch in tqdm(loader, desc=desc, leave=False)]
    return torch.cat(chunks)


class FeatureDataset(Dataset):
    """Cached features [N, C, h, w] as a dataset of {"features": [C, h, w]} items."""

    def __init__(self, features: Tensor) -> None:
        self.features = features

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"features": self.features[index]}


class Mirrored(Dataset):
    """The items of `dataset` flipped left-right (image and mask): the horizontal-flip augmentation.

    Images are flipped, not feature maps: a CNN is not flip-equivariant (asymmetric padding,
    kernels), so the features of a mirrored image are not the mirrored features of the image.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {**item, "image": item["image"].flip(-1), "mask": item["mask"].flip(-1)}  # [C, H, W], W reversed


class Shard(Dataset):
    """One process's share of `dataset` under DDP: items rank, rank + world, rank + 2 world, ..."""

    def __init__(self, dataset: Dataset, rank: int, world: int) -> None:
        self.dataset, self.indices = dataset, range(rank, len(dataset), world)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]


@dataclass(frozen=True)
class Source:
    """Where one item's pixels come from: an image file (absolute, resolved), the tile box cut from it
    (None for the whole image) and whether the item is mirrored."""

    path: str
    box: Box | None = None
    mirrored: bool = False

    def as_list(self) -> list:
        """JSON- and `weights_only`-safe form, stored in the entry and hashed for its file name."""
        return [self.path, None if self.box is None else list(self.box), self.mirrored]

    def stamp(self) -> Stamp:
        """(mtime_ns, size) of the file now: a touch or a rewrite changes it."""
        stat = os.stat(self.path)
        return stat.st_mtime_ns, stat.st_size


def item_sources(dataset: Dataset) -> list[Source]:
    """One `Source` per item, in order, of an `AnomalyDataset` (its samples), a `TileDataset` (its
    (sample, box) tiles), or a `Mirrored` view or `Shard` of one."""
    if isinstance(dataset, Shard):
        sources = item_sources(dataset.dataset)
        return [sources[i] for i in dataset.indices]
    if isinstance(dataset, Mirrored):
        return [replace(source, mirrored=True) for source in item_sources(dataset.dataset)]
    if hasattr(dataset, "tiles"):
        return [Source(str(Path(s.image_path).resolve()), tuple(box)) for s, box in dataset.tiles]
    if hasattr(dataset, "samples"):
        return [Source(str(Path(s.image_path).resolve())) for s in dataset.samples]
    raise TypeError(
        f"the disk feature cache needs a dataset of image samples or tiles, not {type(dataset).__name__}; "
        "use --data.feature_cache memory for this data"
    )


def default_cache_dir() -> Path:
    """`$AD_LIGHTNING_CACHE/features`, else `~/.cache/ad_lightning/features`."""
    root = os.environ.get("AD_LIGHTNING_CACHE")
    return Path(root).expanduser() / "features" if root else Path.home() / ".cache" / "ad_lightning" / "features"


def state_digest(module: torch.nn.Module) -> str:
    """blake2b of every state-dict tensor (name, dtype, shape, bytes): the weights' identity, ~50 ms for Lite0."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # any dtype -> bytes
    return digest.hexdigest()


def backbone_key(backbone: Backbone, image_size: int) -> dict[str, Any]:
    """Everything besides the item itself that changes the features: architecture, fused stages, weights, input size.

    The weights are identified by their digest, not by `weights_source` (kept for reading only): the same
    tensors from another source give the same features. timm and torch versions are in too, since both can
    change what the same weights compute.
    """
    return {
        "version": CACHE_VERSION,
        "backbone": backbone.name,
        "out_indices": list(backbone.model.feature_info.out_indices),
        "grid": backbone.grid,
        "aggregate": backbone.aggregate,
        "weights_digest": state_digest(backbone),
        "image_size": image_size,
        "timm": timm.__version__,
        "torch": torch.__version__,
        "weights_source": backbone.weights_source,
    }


def digest_of(value: Any) -> str:
    """A short stable hash of JSON-able `value` (dict keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


class DiskCache:
    """Per-item backbone features on disk, under `root/<backbone>-<digest of backbone_key>/`."""

    def __init__(self, root: str | Path, key: dict[str, Any]) -> None:
        hashed = {name: value for name, value in key.items() if name not in NOT_HASHED}
        self.dir = Path(root).expanduser() / f"{key['backbone']}-{digest_of(hashed)}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / KEY_FILE).is_file():
                atomic_write(self.dir / KEY_FILE, lambda f: f.write(json.dumps(key, indent=2).encode()))
        except OSError as err:
            fix = "set --data.cache_dir to a writable directory"
            raise OSError(f"cannot write the feature cache in {self.dir} ({err}); {fix}") from err

    def entry_path(self, source: Source) -> Path:
        return self.dir / f"{digest_of(source.as_list())}.pt"

    def load(self, source: Source, stamp: Stamp) -> Tensor | None:
        """The stored features [C, h, w] of `source`, or None when absent, stale (other stamp) or unreadable."""
        path = self.entry_path(source)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            features = entry["features"]
            if entry["source"] != source.as_list() or not isinstance(features, Tensor) or features.ndim != 3:
                raise ValueError(f"entry is not the features of {source.path}")
            current = tuple(entry["stamp"]) == stamp
        except Exception as err:  # torch, pickle and zip raise their own types for a damaged file
            log.warning("feature cache entry %s is unreadable (%s); recomputing it", path, err)
            return None
        return features if current else None

    def save(self, source: Source, stamp: Stamp, features: Tensor) -> None:
        """Store `features` [C, h, w] of `source` as it was at `stamp`; a failed write only costs a recompute later."""
        # clone: a row of the batch tensor would otherwise save the whole batch's storage
        entry = {"source": source.as_list(), "stamp": list(stamp), "features": features.clone()}
        try:
            atomic_write(self.entry_path(source), lambda f: torch.save(entry, f))
        except OSError as err:
            log.warning("cannot write the feature cache entry of %s (%s); it is recomputed next time", source.path, err)

    def extract(
        self,
        encode: Callable[[Tensor], Tensor],
        dataset: Dataset,
        batch_size: int = 32,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        desc: str = "features",
    ) -> Tensor:
        """`extract_features(encode, dataset)` [N, C, h, w], reading the items this cache holds and
        encoding (then storing) only the others."""
        sources = item_sources(dataset)
        stamps = [source.stamp() for source in sources]  # before reading: a file changed meanwhile is stale next time
        found = [self.load(source, stamp) for source, stamp in zip(sources, stamps)]
        missing = [i for i, features in enumerate(found) if features is None]
        if missing:
            computed = extract_features(encode, Subset(dataset, missing), batch_size, device, num_workers, desc)
            for i, features in zip(missing, computed):
                self.save(sources[i], stamps[i], features)
                found[i] = features
        log.info("%s: %d of %d items read from %s", desc, len(sources) - len(missing), len(sources), self.dir)
        return torch.stack(found)  # N x [C, h, w] -> [N, C, h, w]
