"""Download a dataset archive, verify its sha256 every time, and extract it safely and atomically.

    <root>/.downloads/<filename>            the archive, kept so later runs verify it again offline
    <root>/.downloads/<filename>.extracted  which top-level entries it put into <root>, and from which sha256

Usage: `python -m ad_lightning.data.download mvtec --root datasets/mvtec` (or a URL with `--sha256 HEX`).
Nothing is extracted from an archive whose hash does not match, and no archive member may write
outside the extraction directory (no absolute paths, no `..`, no links, no devices or FIFOs).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote, urlparse

from tqdm import tqdm

TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
DOWNLOADS_DIR = ".downloads"
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A dataset could not be fetched, verified or extracted; the message says what to do."""


class ChecksumError(DownloadError):
    """An archive's sha256 differs from the expected one."""


class UnsafeArchiveError(DownloadError):
    """An archive member would write outside the extraction directory or is not a plain file/directory."""


@dataclass(frozen=True)
class DatasetSource:
    """One downloadable archive: mirror URLs tried in order, its sha256 (None: unknown), file name, and the
    folder inside the archive that holds the dataset tree ("" when the tree is at the archive's top level)."""

    name: str
    urls: tuple[str, ...]
    sha256: str | None
    filename: str
    data_dir: str = ""


# Hashes as published in anomalib's datamodules (mvtecad.py, visa.py, btech.py); they match the
# digests other users measured on the archives they downloaded.
DATASETS = {
    "mvtec": DatasetSource(
        "mvtec",
        (
            "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/420938113-1629960298/"
            "mvtec_anomaly_detection.tar.xz",  # anomalib HEAD
            "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
            "mvtec_anomaly_detection.tar.xz",  # older share link, kept as a mirror
        ),
        "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        "mvtec_anomaly_detection.tar.xz",
    ),
    "visa": DatasetSource(
        "visa",
        ("https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",),
        "2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        "VisA_20220922.tar",
    ),
    "btad": DatasetSource(
        "btad",
        ("https://avires.dimi.uniud.it/papers/btad/btad.zip",),
        "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        "btad.zip",
        "BTech_Dataset_transformed",  # <root>/BTech_Dataset_transformed/01/train/ok (anomalib's btech.py)
    ),
}


def resolve_source(name_or_url: str, sha256: str | None = None, filename: str | None = None) -> DatasetSource:
    """Registry entry or URL, with an explicit `sha256`/`filename` taking precedence; refuses an unknown hash."""
    if name_or_url in DATASETS:
        base = DATASETS[name_or_url]
    elif urlparse(name_or_url).scheme in ("http", "https"):
        base = DatasetSource(name_or_url, (name_or_url,), None, _url_filename(name_or_url))
    else:
        raise DownloadError(
            f"unknown dataset {name_or_url!r}; use one of {', '.join(DATASETS)} or an http(s) URL with --sha256 HEX"
        )
    expected = (sha256 or base.sha256 or "").lower()
    if not expected:
        raise DownloadError(
            f"no known sha256 for {name_or_url}; pass the archive's full sha256 explicitly with --sha256 HEX "
            f"(sha256=... in Python), downloads are never used unverified"
        )
    if not SHA256_PATTERN.fullmatch(expected):
        raise DownloadError(f"sha256 {expected!r} is not 64 hex digits; pass the full sha256 of the archive")
    name = filename or base.filename
    if not name or name in (".", "..") or PurePosixPath(name).name != name or PureWindowsPath(name).name != name:
        raise DownloadError(f"archive file name {name!r} must be a plain file name; pass filename=NAME")
    return DatasetSource(base.name, base.urls, expected, name, base.data_dir)


def _url_filename(url: str) -> str:
    """Last path segment of `url`, e.g. `.../VisA_20220922.tar` -> `VisA_20220922.tar`."""
    return unquote(PurePosixPath(urlparse(url).path).name)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise `ChecksumError` naming the file and both hashes unless `path` hashes to `expected`."""
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}. The archive is corrupt, "
            f"incomplete or a different file: delete {path} and run again to download a fresh copy"
        )


def fetch(url: str, target: Path, progress: bool = True) -> None:
    """Stream `url` to `target` through `<target>.part`, resuming a previous `.part` when the server allows."""
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "ad_lightning-download", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the server cannot continue the stale .part: start afresh
            err.close()
            part.unlink()
            return fetch(url, target, progress)
        raise
    with response:
        resumed = response.status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
        offset = offset if resumed else 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=target.name, disable=not progress)
        with open(part, "ab" if resumed else "wb") as file, bar:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                file.write(chunk)
                bar.update(len(chunk))
    received = part.stat().st_size
    if total is not None and received != total:
        raise DownloadError(f"{url} ended after {received} of {total} bytes; run again to resume the download")
    part.replace(target)


def _check_member(name: str, dest: Path, archive: Path) -> None:
    """Refuse a member name that is absolute or resolves outside `dest`."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract the archive")
    if not (dest / name).resolve().is_relative_to(dest.resolve()):
        raise UnsafeArchiveError(f"{archive}: member {name!r} points outside the extraction directory; refusing")


def _safe_tar_members(tar: tarfile.TarFile, dest: Path, archive: Path) -> Iterator[tarfile.TarInfo]:
    """Members of `tar` in archive order, each checked before it is extracted (one pass over the stream)."""
    for member in tar:
        if not (member.isreg() or member.isdir()):
            kind = "link" if member.issym() or member.islnk() else "device or FIFO"
            raise UnsafeArchiveError(
                f"{archive}: member {member.name!r} is a {kind}; only files and directories are allowed, refusing"
            )
        _check_member(member.name, dest, archive)
        yield member


def _extract_tar(archive: Path, dest: Path) -> None:
    """Extract a (compressed) tar, checking every member; `filter="data"` adds Python's own checks where present."""
    filter_kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive, "r:*") as tar:
        for member in _safe_tar_members(tar, dest, archive):
            tar.extract(member, dest, **filter_kwargs)


def _extract_zip(archive: Path, dest: Path) -> None:
    """Extract a zip after checking every entry of its central directory."""
    with zipfile.ZipFile(archive) as zip_file:
        for info in zip_file.infolist():
            mode = stat.S_IFMT(info.external_attr >> 16)  # unix mode lives in the high 16 bits; 0 when absent
            if mode not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a link or special file; refusing")
            _check_member(info.filename, dest, archive)
        zip_file.extractall(dest)


def extract_archive(archive: Path, root: Path) -> list[str]:
    """Extract `archive` into a temporary directory inside `root`, then move its top-level entries into `root`.

    Returns the names of the moved entries. On any error nothing new is left in `root`.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp)
        else:
            raise DownloadError(f"{archive} is neither a zip nor a tar archive; delete it and run again")
        entries = sorted(path.name for path in tmp.iterdir())
        clashes = [name for name in entries if (root / name).exists() or (root / name).is_symlink()]
        if clashes:
            raise DownloadError(
                f"{', '.join(str(root / name) for name in clashes)} already exist(s); the dataset may already be "
                f"extracted (use {root} as it is), or delete them and run again"
            )
        for name in entries:
            os.replace(tmp / name, root / name)
        return entries
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _marker(archive: Path) -> Path:
    """Record of a finished extraction, next to the archive (see the module docstring)."""
    return archive.with_name(archive.name + ".extracted")


def _already_extracted(archive: Path, sha256: str, root: Path) -> bool:
    """True when this archive (same sha256) was extracted into `root` before and its entries are still there."""
    try:
        record = json.loads(_marker(archive).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or not isinstance(record.get("entries"), list):
        return False
    return record.get("sha256") == sha256 and all((root / name).exists() for name in record["entries"])


def _offline_message(source: DatasetSource, archive: Path, reason: object) -> str:
    """What to fetch by hand and where to put it, so the next run verifies and extracts it offline."""
    return (
        f"could not download {source.filename} ({reason}). Fetch the archive by other means from "
        f"{' or '.join(source.urls)} (sha256 {source.sha256}) and save it as {archive}; "
        f"the next run verifies and extracts it without the network"
    )


def _download(source: DatasetSource, archive: Path, progress: bool) -> None:
    """Try each mirror in order; raise one error with manual instructions if none works."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    reason: object = None
    for url in source.urls:
        try:
            return fetch(url, archive, progress)
        except urllib.error.HTTPError as err:
            reason = f"HTTP {err.code} {err.reason} from {url}"
        except (OSError, http.client.HTTPException, DownloadError) as err:  # URLError and timeouts are OSErrors
            reason = f"{type(err).__name__}: {getattr(err, 'reason', err)} for {url}"
    raise DownloadError(_offline_message(source, archive, reason))


def download_dataset(
    name_or_url: str, root: str | Path, sha256: str | None = None, filename: str | None = None, progress: bool = True
) -> Path:
    """Download (unless present), verify and extract a dataset into `root`; returns the dataset tree's folder.

    `name_or_url` is a key of `DATASETS` or an http(s) URL (then `sha256` is required).
    """
    root = Path(root)
    source = resolve_source(name_or_url, sha256, filename)
    archive = root / DOWNLOADS_DIR / source.filename
    if not archive.exists():
        _download(source, archive, progress)
    verify_sha256(archive, source.sha256)
    if not _already_extracted(archive, source.sha256, root):
        entries = extract_archive(archive, root)
        _marker(archive).write_text(json.dumps({"sha256": source.sha256, "entries": entries}))
    return root / source.data_dir


def main(argv: list[str] | None = None) -> int:
    """`download {mvtec,visa,btad}|URL --root R [--sha256 HEX] [--filename NAME] [--no-progress]`."""
    parser = argparse.ArgumentParser(
        prog="ad_lightning download", description="Download, verify (sha256) and safely extract a dataset archive."
    )
    parser.add_argument("dataset", help=f"one of {', '.join(DATASETS)}, or an http(s) URL (needs --sha256)")
    parser.add_argument("--root", required=True, type=Path, help="directory to extract the dataset into")
    parser.add_argument("--sha256", help="expected sha256 of the archive (required for a URL)")
    parser.add_argument("--filename", help="archive file name under ROOT/.downloads (default: from the URL)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        root = download_dataset(args.dataset, args.root, args.sha256, args.filename, not args.no_progress)
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"dataset ready in {root} (pass it as --data.root)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
