"""Unreadable checkpoint files give one clear error that names the file and what is wrong with it."""

import pickle
import zipfile

import numpy as np
import pytest
import torch

from ad_lightning.checkpoint import CheckpointError, SafeCheckpointIO, UnsafeCheckpointError, load_checkpoint

STATE = {"state_dict": {"w": torch.arange(2000.0)}, "global_step": 3}


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.ckpt"
    torch.save(STATE, path)
    return path


def onnx_bytes() -> bytes:
    """The start of an ONNX ModelProto as `torch.onnx.export` writes it: ir_version, producer, graph."""
    return b"\x08\x08\x12\x07pytorch\x1a\x052.4.0:" + bytes(range(64))


def bad_file(kind: str, good_bytes: bytes, tmp_path):
    content, name = {
        "empty": (b"", "empty.ckpt"),
        "random": (np.random.default_rng(0).bytes(4096), "random.ckpt"),
        "truncated": (good_bytes[: len(good_bytes) // 2], "truncated.ckpt"),
        "cut_at_the_end": (good_bytes[:-30], "cut.ckpt"),
        "onnx": (onnx_bytes(), "model.onnx"),
    }[kind]
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "is empty"),
        ("random", "not a PyTorch checkpoint"),
        ("truncated", "truncated or damaged"),
        ("cut_at_the_end", "truncated or damaged"),
        ("onnx", "ONNX"),
    ],
)
def test_unreadable_file_names_the_path_and_the_problem(tmp_path, good, kind, message, mmap):
    path = bad_file(kind, good.read_bytes(), tmp_path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path, mmap=mmap)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert "mmap" not in str(info.value) and "PytorchStreamReader" not in str(info.value)


def test_onnx_error_says_how_to_score_it(tmp_path):
    path = bad_file("onnx", b"", tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert f"python -m ad_lightning predict --ckpt_path {path}" in str(info.value)


def test_lightnings_loader_gives_the_same_error(tmp_path):
    path = bad_file("empty", b"", tmp_path)
    with pytest.raises(CheckpointError, match="is empty"):
        SafeCheckpointIO().load_checkpoint(path)


def test_a_zip_archive_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "images.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.txt", "not weights")
    with pytest.raises(CheckpointError, match=f"{path}.*not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_a_damaged_member_inside_an_intact_archive(good):
    with zipfile.ZipFile(good) as archive:
        offset = next(i.header_offset for i in archive.infolist() if i.filename.endswith("data/0"))
    content = bytearray(good.read_bytes())
    content[offset : offset + 4] = b"XXXX"  # the tensor's local header: the directory still points at it
    good.write_bytes(bytes(content))
    with pytest.raises(CheckpointError, match=f"{good}: it is damaged .*data/0"):
        load_checkpoint(good)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_good_checkpoint_still_loads(good, mmap):
    loaded = load_checkpoint(good, mmap=mmap)
    assert loaded["global_step"] == 3 and torch.equal(loaded["state_dict"]["w"], STATE["state_dict"]["w"])


@pytest.mark.parametrize("mmap", [False, True])
def test_a_legacy_format_checkpoint_loads_mmap_or_not(tmp_path, mmap):
    """torch.save's pre-1.6 format cannot be memory-mapped; it is read into memory instead."""
    path = tmp_path / "legacy.ckpt"
    torch.save(STATE, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    assert torch.equal(load_checkpoint(path, mmap=mmap)["state_dict"]["w"], STATE["state_dict"]["w"])


def test_unsafe_checkpoint_is_still_refused_as_unsafe(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"payload": pickle.loads}, path)  # a function reference: weights-only refuses it
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {path}"):
        load_checkpoint(path)
