"""MNIST and CIFAR10 read from their standard distribution files with numpy alone (no torchvision).

``load_mnist(root)`` reads the four IDX files (plain or gzipped) directly in ``root``;
``load_cifar10(root)`` reads the "CIFAR-10 python version" batches in ``root/cifar-10-batches-py``.
Both return (images float32 [N, C, H, W] in [0, 1], labels int64 [N]). Files are fetched only when asked
(``download=True``, the example scripts' ``--download``), from the usual public addresses.
"""
from __future__ import annotations

import codecs
import gzip
import os
import pickle
import posixpath
import shutil
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_mnist", "load_cifar10", "MNIST_URL", "CIFAR10_URL"]

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_FILES = {True: tuple(f"data_batch_{i}" for i in range(1, 6)), False: ("test_batch",)}
_NUM_CLASSES = 10
_DOWNLOAD_TIMEOUT_S = 60


def _split(train: bool) -> str:
    return "training" if train else "test"


# ----------------------------------------------------------------------------------------------- MNIST


def load_mnist(
    root: str | os.PathLike, train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training (60 000) or test (10 000) split: images [N, 1, 28, 28] float32 in [0, 1], labels int64.

    ``root`` must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (training) or
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (test), each plain or with ``.gz``.
    """
    root = Path(root)
    names = _MNIST_FILES[train]
    missing = [name for name in names if _mnist_file(root, name) is None]
    if missing and not download:
        raise FileNotFoundError(
            f"MNIST {_split(train)} files not found in {root}/: missing {', '.join(missing)} (plain or .gz). "
            f"Download {names[0]}.gz and {names[1]}.gz from {MNIST_URL} into {root}/ (gzipped or extracted), "
            "or pass download=True (--download in the example scripts) to fetch them."
        )
    for name in missing:
        _download(MNIST_URL + name + ".gz", root / (name + ".gz"), f"put {name}.gz from {MNIST_URL} in {root}/")
    images = _read_idx(_mnist_file(root, names[0]), ndim=3)
    labels = _read_idx(_mnist_file(root, names[1]), ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"MNIST images must be 28×28; {names[0]} in {root} holds {images.shape[1:]} images")
    _check_labels(labels, len(images), f"MNIST {_split(train)} split in {root}")
    return _as_tensors(images[:, None], labels)


def _mnist_file(root: Path, name: str) -> Path | None:
    """The plain file if present, else the gzipped one, else None."""
    for candidate in (root / name, root / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with ``ndim`` dimensions (magic number 0x0000080N, big-endian sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * ndim
    expected_magic = 0x800 + ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != expected_magic:
        found = "a file shorter than 4 bytes" if magic is None else f"magic number 0x{magic:08x}"
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s): expected magic number "
            f"0x{expected_magic:08x}, found {found}"
        )
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, expected at least {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(f"{path}: the header announces {shape} = {size} bytes of data, found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


# --------------------------------------------------------------------------------------------- CIFAR10


def load_cifar10(
    root: str | os.PathLike, train: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR10's training (50 000) or test (10 000) split: images [N, 3, 32, 32] float32 in [0, 1], labels int64.

    ``root/cifar-10-batches-py`` must hold ``data_batch_1`` … ``data_batch_5`` (training) or ``test_batch``
    (test), as extracted from ``cifar-10-python.tar.gz``. Only numpy arrays, lists, dicts, bytes and numbers
    are unpickled from them (no arbitrary code).
    """
    root = Path(root)
    directory = root / _CIFAR10_DIR
    names = _CIFAR10_FILES[train]
    missing = [name for name in names if not (directory / name).is_file()]
    if missing and not download:
        raise FileNotFoundError(
            f"CIFAR10 {_split(train)} files not found in {directory}/: missing {', '.join(missing)}. "
            f"Extract {CIFAR10_URL} into {root}/ (it creates {_CIFAR10_DIR}/ with data_batch_1 … data_batch_5 "
            "and test_batch), or pass download=True (--download in the example scripts) to fetch it."
        )
    if missing:
        archive = root / "cifar-10-python.tar.gz"
        _download(CIFAR10_URL, archive, f"extract cifar-10-python.tar.gz from {CIFAR10_URL} into {root}/")
        _extract_cifar10(archive, root)
        archive.unlink()
    batches = [_read_cifar10_batch(directory / name) for name in names]
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([labels for _, labels in batches])
    return _as_tensors(images, labels)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR batch needs nothing else.

    numpy's array rebuilders (protocols up to 4, and 5) are accepted under their numpy 1 and numpy 2 module
    names; ``_codecs.encode`` is how Python 3 writes bytes in protocol-2 pickles.
    """

    _NUMPY = {
        "_reconstruct": np.empty(0).__reduce__()[0],
        "_frombuffer": np.empty(0).__reduce_ex__(5)[0],
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self._NUMPY:
            return self._NUMPY[name]
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR10 batch holds only numpy arrays")


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [N, 3072], labels int64 [N]) of one pickled batch, checked."""
    with open(path, "rb") as f:
        try:
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except Exception as err:  # whatever a foreign or truncated pickle raises, report the file
            raise ValueError(f"{path} is not a CIFAR10 python batch: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR10 python batch: expected a dict with keys b'data' and b'labels'")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape [N, 3072]; found {what}")
    labels = np.asarray(batch[b"labels"])
    _check_labels(labels, len(data), str(path))
    return data, labels


def _extract_cifar10(archive: Path, root: Path) -> None:
    """Writes the archive's CIFAR10 batch files to ``root/cifar-10-batches-py``; every other member is
    ignored, so no member can write outside that directory."""
    wanted = {posixpath.join(_CIFAR10_DIR, name) for split in _CIFAR10_FILES.values() for name in split}
    (root / _CIFAR10_DIR).mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = posixpath.normpath(member.name)
            if member.isfile() and name in wanted:
                with tar.extractfile(member) as source, open(root / name, "wb") as target:
                    shutil.copyfileobj(source, target)
                wanted.discard(name)
    if wanted:
        raise ValueError(f"{archive} lacks {', '.join(sorted(wanted))}; is it cifar-10-python.tar.gz?")


# ---------------------------------------------------------------------------------------------- shared


def _check_labels(labels: np.ndarray, count: int, where: str) -> None:
    if labels.shape != (count,):
        raise ValueError(f"{where}: {count} images but labels of shape {labels.shape}")
    if count and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise ValueError(f"{where}: labels must lie in 0…{_NUM_CLASSES - 1}; found {labels.min()}…{labels.max()}")


def _as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images → float32 in [0, 1]; labels → int64."""
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def _download(url: str, target: Path, manual_step: str) -> None:
    """Streams ``url`` to ``target`` (via a ``.part`` file, so a failed download leaves nothing behind).

    Network failures become ConnectionError saying that the machine seems offline and how to place the
    file by hand (``manual_step``).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")

    def offline(err: OSError) -> ConnectionError:
        return ConnectionError(
            f"could not download {url} ({err}); this machine seems to be offline or the server unreachable. "
            f"Download it on a connected machine and {manual_step}."
        )

    try:
        try:
            response = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)
        except OSError as err:
            raise offline(err) from err
        with response, open(partial, "wb") as out:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as err:
                    raise offline(err) from err
                if not chunk:
                    break
                out.write(chunk)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
