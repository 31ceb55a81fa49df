"""Safe checkpoint files: loaded with `weights_only=True` only, written atomically.

A checkpoint from a stranger must not run code: `torch.load(weights_only=True)` unpickles plain
tensors and containers only, and anything else is refused with `UnsafeCheckpointError` before a
single object is built. A file that is no checkpoint at all (empty, cut short, an ONNX export,
random bytes) is recognised from its bytes first and refused with a `CheckpointError` naming it.
A kill during a save must not cost the last good checkpoint: the file is written beside its target
and moved over it with one `os.replace` (atomic on POSIX); reports are written the same way.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ad_lightning.errors import BadInputError

# torch.save's pre-zip ("legacy") format opens with its magic number, pickled with protocol 2
LEGACY_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
ZIP_HEADER = b"PK\x03\x04"  # a zip archive's first local file header
RETRY = "use another checkpoint (e.g. an earlier last.ckpt) or train one with `python -m ad_lightning fit`"


class UnsafeCheckpointError(RuntimeError):
    """The file holds pickled objects that `weights_only=True` will not build."""


class CheckpointError(BadInputError):
    """The file is not a loadable checkpoint (empty, damaged, another format); the message names it."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; when the block ends without error the file is flushed
    to disk and `os.replace`d onto `path`, so `path` is always either its previous complete content or
    the new one. Temporary files of a writer killed earlier are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        stale.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into `path`, atomically (`atomic_path`)."""
    with atomic_path(path) as partial, partial.open("wb") as f:
        write(f)


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)`, atomically (`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def resolve_checkpoint(path: str | None, root: str | Path = "runs", missing_last_ok: bool = False) -> str | None:
    """The checkpoint file `path` stands for, checked to load weights-only (`UnsafeCheckpointError` if not).

    A directory stands for the newest `*.ckpt` below it (e.g. `--ckpt_path runs`); `last` for the
    newest `last.ckpt` below `root` (each run writes into a new version directory, where Lightning's
    own `last` would find nothing and silently start from scratch). With `missing_last_ok` (resuming
    `fit`) a missing `last` means a fresh start, said out loud.
    """
    if path is None:
        return None
    if path == "last":
        found = sorted(Path(root).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime) if Path(root).is_dir() else []
        if not found and missing_last_ok:
            print(f"no last.ckpt under {root}: starting from scratch")
            return None
        if not found:
            raise FileNotFoundError(f"--ckpt_path last: no last.ckpt under {root}; train with `python -m ad_lightning fit`")
    elif Path(path).is_dir():
        found = sorted(Path(path).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no *.ckpt file under {path}; train one with `python -m ad_lightning fit` first")
    else:
        found = [Path(path)]
    if not found[-1].is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .ckpt file, a directory of runs or `last`")
    load_checkpoint(found[-1], mmap=True)  # refuses a file that needs arbitrary unpickling, before anything else reads it
    if str(found[-1]) != path:
        print(f"checkpoint: {found[-1]}")
    return str(found[-1])


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


def _is_torch_zip(path: Path) -> bool:
    """Whether `path` is in torch.save's zip format (True) or its legacy format (False); anything else
    raises a `CheckpointError` saying what the file is. Reads the header and the zip directory only."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot load checkpoint {path}: the file is empty (0 bytes); {RETRY}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.rsplit("/", 1)[-1] == "data.pkl" for name in archive.namelist()):
                return True
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is a zip archive but not a PyTorch checkpoint (no data.pkl inside); "
            "pass a .ckpt written by `python -m ad_lightning fit`"
        )
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{path} is an ONNX export, not a checkpoint: score it with "
            f"`python -m ad_lightning predict --ckpt_path {path}`, or pass the .ckpt it was exported from"
        )
    with path.open("rb") as f:
        header = f.read(len(LEGACY_HEADER))
    if header.startswith(ZIP_HEADER):
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is truncated or damaged (a zip archive without its end, the "
            f"central directory, as when a copy or download is cut short); copy it again or {RETRY}"
        )
    if header != LEGACY_HEADER:
        raise CheckpointError(
            f"cannot load checkpoint {path}: it is not a PyTorch checkpoint (in neither format that torch.save "
            "writes); pass a .ckpt written by `python -m ad_lightning fit`"
        )
    return False


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """`torch.load(path, weights_only=True)`, refusing files that need arbitrary unpickling
    (`UnsafeCheckpointError`) and files that are no checkpoint (`CheckpointError`). `mmap` applies
    to torch's zip format; a legacy-format file cannot be mapped and is read into memory instead."""
    try:
        mmap = _is_torch_zip(Path(path)) and mmap
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as err:  # the zip directory is intact but a member is not (torch's zip reader says so)
        if "PytorchStreamReader" not in str(err):
            raise
        reason = str(err).strip().split(". ")[0]  # torch's first sentence names the member
        raise CheckpointError(f"cannot load checkpoint {path}: it is damaged ({reason}); copy it again or {RETRY}") from None
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds pickled objects that are not plain weights ({reason}). "
            "ad_lightning loads checkpoints with weights_only=True so that a file from elsewhere cannot run "
            "code; nothing from it was executed. Use a checkpoint written by `python -m ad_lightning fit`, "
            "or re-save the state dict as plain tensors from an environment you trust."
        ) from None
