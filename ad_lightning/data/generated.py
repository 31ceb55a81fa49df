"""What the built-in generated sets (`Demo`, `Photos`) share: where they live, the validated settings that
identify a set, generation that is cached and atomic, the DataModule that generates on first use, and
the command line that generates one by hand."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ad_lightning.data.mvtec import MVTecAD

MINIMUM = {"seed": 0, "n_train": 1, "n_test_good": 0, "n_per_defect": 1, "image_size": 32}  # least allowed values



def sample_key(seed: int, category: str, split: str, kind: str, index: int) -> list[int]:
    """The random-generator key of one generated image: (seed, category, split, kind, index) alone, so
    an image never depends on the order of generation or on which other images were generated."""
    return [seed, zlib.crc32(category.encode()), zlib.crc32(f"{split}/{kind}".encode()), index]

def default_root(name: str) -> Path:
    """Where a generated set lives: `$AD_LIGHTNING_DATA/<name>`, else `~/.cache/ad_lightning/<name>`."""
    data = os.environ.get("AD_LIGHTNING_DATA")
    return Path(data).expanduser() / name if data else Path.home() / ".cache" / "ad_lightning" / name


def set_settings(
    signature: inspect.Signature, seed: int, version: int, check_category: Callable[[str], None], kind: str, **kwargs
) -> dict:
    """The JSON record of a set: the arguments of its generator (`signature`: `(root, seed, categories,
    n_train, n_test_good, n_per_defect, image_size)`) with defaults filled in and validated (known
    categories, integer counts at least `MINIMUM`), plus the renderer's `version`."""
    bound = signature.bind(None, seed, **kwargs)
    bound.apply_defaults()
    categories = bound.arguments["categories"]
    categories = [categories] if isinstance(categories, str) else list(categories)
    settings = {**bound.arguments, "categories": categories, "version": version}
    del settings["root"]
    for name in categories:
        check_category(name)
    for name, least in MINIMUM.items():
        value = settings[name]
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{kind} setting {name}={value!r} must be an integer >= {least}")
        settings[name] = int(value)
    return settings


def read_settings(root: Path, settings_file: str) -> dict | None:
    """The settings of the complete generated set in `root`, or None if there is none."""
    try:
        return json.loads((root / settings_file).read_text())
    except (OSError, ValueError):
        return None


def ensure_generated(root: Path, settings: dict, settings_file: str, generate: Callable[[Path], Any], kind: str) -> Path:
    """The set described by `settings` at `root`, made by `generate(directory)` only once.

    Reuses a complete set (its `settings_file`, written last, equals `settings`); otherwise renders into
    a hidden sibling directory and renames it into place, so an interrupted run never leaves a set that
    looks complete, and never replaces a directory that is not such a set."""
    if read_settings(root, settings_file) == settings:
        return root
    if root.exists() and any(root.iterdir()) and read_settings(root, settings_file) is None:
        raise FileExistsError(
            f"{root} exists and is not a {kind} set (no {settings_file}); pass a new or empty directory as root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    partial_dir = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        generate(partial_dir)
        move_into_place(partial_dir, root, settings, settings_file)
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
    return root


def move_into_place(new: Path, root: Path, settings: dict, settings_file: str) -> None:
    """Replace `root` by the finished set `new` by renaming (an old set is first moved aside, then
    deleted); keeps `root` if a concurrent run has already put the same set there."""
    if read_settings(root, settings_file) == settings:
        return
    stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".stale", dir=root.parent))
    try:
        if root.exists():
            root.rename(stale / root.name)
        new.rename(root)
    finally:
        shutil.rmtree(stale, ignore_errors=True)


class GeneratedSet(MVTecAD):
    """A set generated on first use into a cache directory, read in the MVTec layout; a subclass says how
    (`ensure`: generate it unless it is there)."""

    def ensure(self) -> Path:
        raise NotImplementedError(f"{type(self).__name__} must implement ensure()")

    def prepare_data(self) -> None:
        self.ensure()

    def setup(self, stage: str | None = None) -> None:
        self.ensure()  # also when prepare_data did not run (e.g. a bare setup call)
        super().setup(stage)


def generator_main(
    argv: Sequence[str] | None, kind: str, ensure: Callable[..., Path], categories: Sequence[str], counts: dict[str, int]
) -> None:
    """`python -m ad_lightning.data.<kind> [--root DIR] [--seed 0] [...]`: generate a set by hand."""
    parser = argparse.ArgumentParser(description=f"Generate the built-in {kind} set (MVTec-AD layout).")
    parser.add_argument("--root", type=Path, default=None, help="output directory (default: the user cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", default=",".join(categories), help="comma-separated subset")
    for name, default in {**counts, "image_size": 256}.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    values = {name: getattr(args, name) for name in (*counts, "image_size")}
    root = ensure(args.root, args.seed, categories=tuple(args.categories.split(",")), **values)
    print(f"{kind} set ready at {root} ({time.perf_counter() - start:.1f} s)")
