"""The MNIST IDX reader: the real files parse; missing, truncated or corrupted files fail clearly."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from sven.bench.mnist import MNIST_FILES, load_mnist, mnist_paths, read_idx
from sven.bench.tasks import DEFAULT_MNIST_DIR

needs_mnist = pytest.mark.skipif(not all((DEFAULT_MNIST_DIR / name).is_file() for name in MNIST_FILES.values()),
                                 reason=f"MNIST files not in {DEFAULT_MNIST_DIR}")


def write_idx(path: Path, shape: tuple[int, ...], payload: bytes) -> Path:
    """A gzip IDX file of unsigned bytes whose header announces ``shape``."""
    header = bytes([0, 0, 0x08, len(shape)]) + b"".join(size.to_bytes(4, "big") for size in shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + payload)
    return path


@needs_mnist
def test_real_files_parse_with_expected_shapes_and_labels() -> None:
    train_images, train_labels, test_images, test_labels = load_mnist(DEFAULT_MNIST_DIR)
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == torch.uint8
    assert test_images.shape == (10000, 28, 28)
    assert train_labels.shape == (60000,) and test_labels.shape == (10000,)
    assert set(train_labels.unique().tolist()) == set(range(10))
    assert int(train_images.max()) == 255 and int(train_images.min()) == 0


def test_small_idx_round_trip(tmp_path: Path) -> None:
    data = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x.gz", (2, 3, 4), data.numpy().tobytes())
    assert torch.equal(read_idx(path), data)


def test_payload_shorter_than_header_says_is_rejected(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "short.gz", (2, 3, 4), bytes(20))
    with pytest.raises(ValueError, match=r"needs 40.*truncated or corrupted"):
        read_idx(path)


def test_wrong_magic_and_data_type_are_rejected(tmp_path: Path) -> None:
    bad_magic = tmp_path / "magic.gz"
    with gzip.open(bad_magic, "wb") as stream:
        stream.write(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="magic bytes 0x00 0x00, got 0102"):
        read_idx(bad_magic)
    floats = tmp_path / "floats.gz"
    with gzip.open(floats, "wb") as stream:
        stream.write(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + bytes(4))
    with pytest.raises(ValueError, match="0x0d; expected 0x08"):
        read_idx(floats)


@needs_mnist
def test_truncated_gzip_of_the_real_file_is_rejected(tmp_path: Path) -> None:
    original = (DEFAULT_MNIST_DIR / MNIST_FILES["test_labels"]).read_bytes()
    truncated = tmp_path / MNIST_FILES["test_labels"]
    truncated.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        read_idx(truncated)


@needs_mnist
def test_corrupted_bytes_in_the_real_file_are_rejected(tmp_path: Path) -> None:
    corrupted = bytearray((DEFAULT_MNIST_DIR / MNIST_FILES["test_labels"]).read_bytes())
    corrupted[len(corrupted) // 2: len(corrupted) // 2 + 64] = bytes(64)
    path = tmp_path / MNIST_FILES["test_labels"]
    path.write_bytes(bytes(corrupted))
    with pytest.raises(ValueError, match="corrupted or truncated"):
        read_idx(path)


def test_missing_files_name_all_four_and_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        mnist_paths(tmp_path)
    message = str(error.value)
    assert str(tmp_path.resolve()) in message
    assert all(name in message for name in MNIST_FILES.values())


@needs_mnist
def test_labels_outside_0_to_9_are_rejected(tmp_path: Path) -> None:
    for name in MNIST_FILES.values():
        shutil.copy(DEFAULT_MNIST_DIR / name, tmp_path / name)
    write_idx(tmp_path / MNIST_FILES["test_labels"], (10000,), bytes([12]) * 10000)
    with pytest.raises(ValueError, match="labels must lie in 0..9; got a maximum of 12"):
        load_mnist(tmp_path)
