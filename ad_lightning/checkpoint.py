"""Safe checkpoint files: loaded with `weights_only=True` only, written atomically.

A checkpoint from a stranger must not run code: `torch.load(weights_only=True)` unpickles plain
tensors and containers only, and anything else is refused with `UnsafeCheckpointError` before a
single object is built. A kill during a save must not cost the last good checkpoint: the file is
written beside its target and moved over it with one `os.replace` (atomic on POSIX).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class UnsafeCheckpointError(RuntimeError):
    """The file holds pickled objects that `weights_only=True` will not build."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """`torch.load(path, weights_only=True)`, refusing files that need arbitrary unpickling."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects that are not plain weights ({reason}). "
            "ad_lightning loads checkpoints with weights_only=True so that a file from elsewhere cannot run "
            "code; nothing from it was executed. Use a checkpoint written by `python -m ad_lightning fit`, "
            "or re-save the state dict as plain tensors from an environment you trust."
        ) from None


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into a temporary file beside `path`, flushed to disk, then `os.replace`d onto
    it: `path` is always either its previous complete content or the new one. Temporary files of a
    writer killed earlier are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        stale.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically (`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic saves and weights-only loads (the Trainer's default
    here, set in configs/default.yaml)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"SafeCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise UnsafeCheckpointError(f"refusing to load {path} with weights_only=False; checkpoints load weights-only")
        return load_checkpoint(path, map_location)
