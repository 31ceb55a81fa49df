"""Download, sha256 verification and safe extraction against archives served on 127.0.0.1 (no internet)."""

import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ad_lightning.data import download
from ad_lightning.data.download import (
    DATASETS,
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download_dataset,
    main,
)
DOWNLOADS = download.DOWNLOADS_DIR
GOOD_FILES = {"widget/train/good/000.png": b"pixels-0", "widget/readme.txt": b"hello"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tar(files: dict[str, bytes], links: dict[str, str] | None = None, mode: str = "w:gz") -> bytes:
    """A tar archive with the given regular files and symlinks (name -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buffer.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zip_file:
        for name, data in files.items():
            zip_file.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


class ArchiveServer:
    """Serves `files` (URL path -> bytes) on loopback; counts requests; can cut a body short or honour Range."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.cut_after: int | None = None  # send Content-Length in full but close after this many body bytes
        handler = type("Handler", (_Handler,), {"state": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"


class _Handler(BaseHTTPRequestHandler):
    state: ArchiveServer

    def do_GET(self) -> None:
        self.state.requests.append(self.path)
        data = self.state.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers["Range"] else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        cut = len(data) if self.state.cut_after is None else self.state.cut_after
        self.wfile.write(data[start:cut])
        self.close_connection = True

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server():
    archive_server = ArchiveServer()
    archive_server.thread.start()
    yield archive_server
    archive_server.httpd.shutdown()
    archive_server.httpd.server_close()
    archive_server.thread.join(timeout=5)


def serve(server: ArchiveServer, name: str, data: bytes) -> tuple[str, str]:
    server.files[name] = data
    return server.url(name), sha256(data)


def visible(root: Path) -> list[str]:
    """Everything in `root` except the `.downloads` folder, i.e. what extraction left behind."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if DOWNLOADS not in p.relative_to(root).parts)



@pytest.mark.parametrize("name, mode", [("set.tar.gz", "w:gz"), ("set.tar.xz", "w:xz")])
def test_good_checksum_downloads_and_extracts(server, tmp_path, name, mode):
    url, digest = serve(server, name, make_tar(GOOD_FILES, mode=mode))
    assert download_dataset(url, tmp_path, sha256=digest, progress=False) == tmp_path
    for member, data in GOOD_FILES.items():
        assert (tmp_path / member).read_bytes() == data
    assert (tmp_path / DOWNLOADS / name).read_bytes() == server.files[name]
    assert not list((tmp_path / DOWNLOADS).glob("*.part"))
    assert not list(tmp_path.glob(".extract-*"))


def test_zip_downloads_and_extracts(server, tmp_path):
    url, digest = serve(server, "set.zip", make_zip(GOOD_FILES))
    download_dataset(url, tmp_path, sha256=digest.upper(), progress=False)
    assert (tmp_path / "widget/readme.txt").read_bytes() == b"hello"


def test_cached_archive_is_verified_again_without_network(server, tmp_path):
    url, digest = serve(server, "set.tar.gz", make_tar(GOOD_FILES))
    download_dataset(url, tmp_path, sha256=digest, progress=False)
    download_dataset(url, tmp_path, sha256=digest, progress=False)  # verified, already extracted
    assert len(server.requests) == 1
    cached = tmp_path / DOWNLOADS / "set.tar.gz"
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")
    with pytest.raises(ChecksumError) as err:
        download_dataset(url, tmp_path, sha256=digest, progress=False)
    message = str(err.value)
    assert str(cached) in message and digest in message and sha256(cached.read_bytes()) in message
    assert "delete" in message
    assert len(server.requests) == 1


def test_removed_extraction_is_redone_from_cached_archive(server, tmp_path):
    url, digest = serve(server, "set.tar.gz", make_tar(GOOD_FILES))
    download_dataset(url, tmp_path, sha256=digest, progress=False)
    (tmp_path / "widget/readme.txt").unlink()
    (tmp_path / "widget/train/good/000.png").unlink()
    for path in sorted((tmp_path / "widget").rglob("*"), reverse=True):
        path.rmdir()
    (tmp_path / "widget").rmdir()
    download_dataset(url, tmp_path, sha256=digest, progress=False)
    assert (tmp_path / "widget/readme.txt").read_bytes() == b"hello"
    assert len(server.requests) == 1


def test_bad_checksum_extracts_nothing(server, tmp_path):
    url, _ = serve(server, "set.tar.gz", make_tar(GOOD_FILES))
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download_dataset(url, tmp_path, sha256="0" * 64, progress=False)
    assert visible(tmp_path) == []


@pytest.mark.parametrize(
    "archive, member",
    [
        (make_tar({**GOOD_FILES, "../escape.txt": b"x"}), "../escape.txt"),
        (make_tar({**GOOD_FILES, "widget/../../escape.txt": b"x"}), "widget/../../escape.txt"),
        (make_tar({**GOOD_FILES, "/tmp/absolute.txt": b"x"}), "/tmp/absolute.txt"),
        (make_tar(GOOD_FILES, links={"widget/passwd": "/etc/passwd"}), "widget/passwd"),
        (make_tar(GOOD_FILES, links={"widget/up": "../../outside"}), "widget/up"),
        (make_zip({**GOOD_FILES, "../escape.txt": b"x"}), "../escape.txt"),
        (make_zip({**GOOD_FILES, "/abs.txt": b"x"}), "/abs.txt"),
    ],
    ids=["tar-dotdot", "tar-nested", "tar-absolute", "tar-symlink-abs", "tar-symlink-rel", "zip-dotdot", "zip-abs"],
)
def test_unsafe_members_are_refused_and_nothing_is_extracted(server, tmp_path, archive, member):
    root = tmp_path / "root"
    url, digest = serve(server, "evil.bin", archive)
    with pytest.raises(UnsafeArchiveError) as err:
        download_dataset(url, root, sha256=digest, progress=False)
    assert repr(member) in str(err.value)
    assert visible(root) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_device_and_fifo_members_are_refused(server, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("widget/fifo")
        info.type = tarfile.FIFOTYPE
        tar.addfile(info)
    url, digest = serve(server, "fifo.tar", buffer.getvalue())
    with pytest.raises(UnsafeArchiveError, match="'widget/fifo' is a device or FIFO"):
        download_dataset(url, tmp_path, sha256=digest, progress=False)
    assert visible(tmp_path) == []


def test_existing_entries_are_not_overwritten(server, tmp_path):
    (tmp_path / "widget").mkdir()
    (tmp_path / "widget/mine.txt").write_text("user data")
    url, digest = serve(server, "set.tar.gz", make_tar(GOOD_FILES))
    with pytest.raises(DownloadError, match="already exist"):
        download_dataset(url, tmp_path, sha256=digest, progress=False)
    assert visible(tmp_path) == ["widget", "widget/mine.txt"]


def test_connection_cut_mid_file_names_url_and_resumes(server, tmp_path):
    data = make_tar({"widget/big.bin": bytes(range(256)) * 400}, mode="w")
    url, digest = serve(server, "set.tar", data)
    server.cut_after = len(data) // 2
    with pytest.raises(DownloadError) as err:
        download_dataset(url, tmp_path, sha256=digest, progress=False)
    assert url in str(err.value) and f"of {len(data)} bytes" in str(err.value)
    assert not (tmp_path / DOWNLOADS / "set.tar").exists()  # only the .part, which never counts as complete
    assert (tmp_path / DOWNLOADS / "set.tar.part").stat().st_size == len(data) // 2
    assert visible(tmp_path) == []
    server.cut_after = None
    download_dataset(url, tmp_path, sha256=digest, progress=False)
    assert (tmp_path / "widget/big.bin").read_bytes() == bytes(range(256)) * 400
    assert not (tmp_path / DOWNLOADS / "set.tar.part").exists()


def test_http_404_names_url_and_leaves_no_archive(server, tmp_path):
    url = server.url("missing.tar")
    with pytest.raises(DownloadError) as err:
        download_dataset(url, tmp_path, sha256="a" * 64, progress=False)
    assert "HTTP 404" in str(err.value) and url in str(err.value)
    assert not (tmp_path / DOWNLOADS / "missing.tar").exists()
    assert visible(tmp_path) == []


def test_unreachable_host_says_what_to_fetch_and_where(tmp_path):
    with socket.socket() as probe:  # a loopback port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, digest = f"http://127.0.0.1:{port}/VisA.tar", "b" * 64
    with pytest.raises(DownloadError) as err:
        download_dataset(url, tmp_path, sha256=digest, progress=False)
    message = str(err.value)
    assert url in message and digest in message and str(tmp_path / DOWNLOADS / "VisA.tar") in message


def test_manually_placed_archive_is_used_offline(tmp_path):
    data = make_tar(GOOD_FILES)
    (tmp_path / DOWNLOADS).mkdir()
    (tmp_path / DOWNLOADS / "manual.tar.gz").write_bytes(data)
    download_dataset("http://127.0.0.1:9/manual.tar.gz", tmp_path, sha256=sha256(data), progress=False)
    assert (tmp_path / "widget/readme.txt").read_bytes() == b"hello"


def test_unknown_sha256_is_refused_before_any_request(server, monkeypatch, tmp_path):
    url, _ = serve(server, "set.tar.gz", make_tar(GOOD_FILES))
    with pytest.raises(DownloadError, match="--sha256 HEX"):
        download_dataset(url, tmp_path, progress=False)
    monkeypatch.setitem(DATASETS, "mystery", download.DatasetSource("mystery", (url,), None, "set.tar.gz"))
    with pytest.raises(DownloadError, match="--sha256 HEX"):
        download_dataset("mystery", tmp_path, progress=False)
    with pytest.raises(DownloadError, match="64 hex digits"):
        download_dataset(url, tmp_path, sha256="abc123", progress=False)
    assert server.requests == []
    assert not (tmp_path / DOWNLOADS).exists()


def test_registry_data_dir_is_returned(server, monkeypatch, tmp_path):
    url, digest = serve(server, "nested.zip", make_zip({"Wrapped/01/train/ok/0.bmp": b"bmp"}))
    monkeypatch.setitem(DATASETS, "nested", download.DatasetSource("nested", (url,), digest, "nested.zip", "Wrapped"))
    assert download_dataset("nested", tmp_path, progress=False) == tmp_path / "Wrapped"
    assert (tmp_path / "Wrapped/01/train/ok/0.bmp").read_bytes() == b"bmp"


def test_registry_entries_are_complete():
    assert set(DATASETS) == {"mvtec", "visa", "btad"}
    for source in DATASETS.values():
        assert source.sha256 is None or download.SHA256_PATTERN.fullmatch(source.sha256)
        assert source.urls and all(url.startswith("https://") and url.endswith(source.filename) for url in source.urls)


def test_cli_downloads_from_url(server, tmp_path, capsys):
    url, digest = serve(server, "set.tar.gz", make_tar(GOOD_FILES))
    assert main([url, "--root", str(tmp_path), "--sha256", digest, "--no-progress"]) == 0
    assert (tmp_path / "widget/train/good/000.png").read_bytes() == b"pixels-0"
    assert str(tmp_path) in capsys.readouterr().out
    assert main([url, "--root", str(tmp_path / "other"), "--sha256", "0" * 64, "--no-progress"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_cli_rejects_unknown_dataset(tmp_path, capsys):
    assert main(["imagenet", "--root", str(tmp_path)]) == 1
    assert "mvtec, visa, btad" in capsys.readouterr().err
