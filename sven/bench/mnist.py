"""Reader for the original MNIST IDX files (gzip-compressed), with clear errors for missing or damaged files."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
UNSIGNED_BYTE = 0x08


def read_idx(path: str | Path) -> Tensor:
    """The uint8 array stored in one gzip-compressed IDX file, shape given by its header (e.g. (N, 28, 28)).

    Raises ValueError when the file is not valid gzip, is truncated, or its header does not describe its data.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is not a readable gzip file (corrupted or truncated): {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        found = raw[:2].hex() or "nothing"
        raise ValueError(f"{path} has no IDX header: expected the magic bytes 0x00 0x00, got {found}")
    if raw[2] != UNSIGNED_BYTE:
        raise ValueError(f"{path}: IDX data type code 0x{raw[2]:02x}; expected 0x08 (unsigned byte)")
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path} is truncated: the header needs {header_size} bytes, the file holds {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"{path} holds {len(raw)} bytes after decompression; its header (shape {shape}) needs {expected}: "
            "the file is truncated or corrupted"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)
    return torch.from_numpy(data.copy())


def mnist_paths(data_dir: str | Path) -> dict[str, Path]:
    """The four MNIST file paths in ``data_dir``; FileNotFoundError naming them and the directory if any is missing."""
    data_dir = Path(data_dir).expanduser().resolve()
    paths = {key: data_dir / name for key, name in MNIST_FILES.items()}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNIST files missing in {data_dir}: {', '.join(missing)}. Expected the four original IDX files "
            f"{', '.join(MNIST_FILES.values())} there (pass --data-dir DIR)."
        )
    return paths


def load_mnist(data_dir: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images (60000, 28, 28) uint8, train labels (60000,) int64, test images, test labels).

    Raises ValueError when image and label counts disagree or a label is outside 0..9.
    """
    paths = mnist_paths(data_dir)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"MNIST {split} split: expected images (N, 28, 28) and labels (N,); "
                f"got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if int(labels.max()) > 9:
            raise ValueError(f"MNIST {split} labels must lie in 0..9; got a maximum of {int(labels.max())}")
    return (arrays["train_images"], arrays["train_labels"].long(),
            arrays["test_images"], arrays["test_labels"].long())
