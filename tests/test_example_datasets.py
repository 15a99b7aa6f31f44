"""The example datasets: MNIST / CIFAR10 readers on tiny files in the exact distribution formats (never a
real download), their error messages, and the procedurally drawn shapes dataset."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from tm_tensorboard.examples.datasets import CIFAR10_URL, MNIST_URL, load_cifar10, load_mnist
from tm_tensorboard.examples.shapes import CLASSES, make_shapes

MNIST_NAMES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """``array`` (uint8) in the IDX format: magic 0x0000080<ndim>, big-endian uint32 sizes, raw bytes."""
    magic = 0x800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path, data: bytes, gz: bool = False) -> None:
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def mnist_arrays(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, count, dtype=np.uint8)


def as_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).to(torch.float32) / 255


def cifar_batch(count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch",
        b"labels": rng.integers(0, 10, count).tolist(),
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(count)],
    }


def write_cifar(root, names, protocol: int = 2) -> dict[str, dict]:
    directory = root / "cifar-10-batches-py"
    directory.mkdir(parents=True, exist_ok=True)
    batches = {name: cifar_batch(2 + i, seed=i) for i, name in enumerate(names)}
    for name, batch in batches.items():
        (directory / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


# ------------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_mnist_reads_idx_files_exactly(tmp_path, train, gz):
    images, labels = mnist_arrays(5)
    write(tmp_path / MNIST_NAMES[train][0], idx_bytes(images), gz)
    write(tmp_path / MNIST_NAMES[train][1], idx_bytes(labels), gz)
    x, y = load_mnist(tmp_path, train=train)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert torch.equal(x[:, 0], as_float(images))
    assert torch.equal(y, torch.from_numpy(labels).long())
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_mnist_accepts_a_mix_of_plain_and_gzipped_files(tmp_path):
    images, labels = mnist_arrays(3)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images), gz=True)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(labels))
    x, y = load_mnist(tmp_path)
    assert torch.equal(x[:, 0], as_float(images)) and torch.equal(y, torch.from_numpy(labels).long())


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (idx_bytes(np.zeros((2, 28, 28), np.uint8), magic=0x801), idx_bytes(np.zeros(2, np.uint8)),
         "expected magic number 0x00000803, found magic number 0x00000801"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-5], idx_bytes(np.zeros(2, np.uint8)),
         r"announces \(2, 28, 28\) = 1568 bytes of data, found 1563"),
        (b"\x00\x00", idx_bytes(np.zeros(2, np.uint8)), "shorter than 4 bytes"),
        (idx_bytes(np.zeros((2, 27, 27), np.uint8)), idx_bytes(np.zeros(2, np.uint8)), "must be 28×28"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8)), idx_bytes(np.zeros(3, np.uint8)),
         r"2 images but labels of shape \(3,\)"),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8)), idx_bytes(np.array([1, 10], np.uint8)),
         "labels must lie in 0…9"),
    ],
    ids=["magic", "truncated", "empty", "size", "count", "label-range"],
)
def test_mnist_rejects_malformed_files(tmp_path, images, labels, message):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(images)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(ValueError, match=message):
        load_mnist(tmp_path)


def test_missing_mnist_says_which_files_to_put_where(tmp_path):
    images, _ = mnist_arrays(2)
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(images))
    with pytest.raises(FileNotFoundError) as raised:
        load_mnist(tmp_path, train=False)
    message = str(raised.value)
    assert "missing t10k-labels-idx1-ubyte (plain or .gz)" in message
    assert "missing t10k-images" not in message  # only what is really missing
    assert f"{tmp_path}/" in message and MNIST_URL in message and "--download" in message
    assert os.listdir(tmp_path) == ["t10k-images-idx3-ubyte"]  # nothing fetched without download=True


def fake_urlopen(monkeypatch, payloads: dict[str, bytes]) -> list[str]:
    """Serves ``payloads`` instead of the network; any other address fails as if offline."""
    requested: list[str] = []

    def urlopen(url, timeout=None):
        requested.append(url)
        if url not in payloads:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return io.BytesIO(payloads[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


def test_mnist_download_fetches_only_missing_files(tmp_path, monkeypatch):
    images, labels = mnist_arrays(4)
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(images))
    url = MNIST_URL + "train-labels-idx1-ubyte.gz"
    requested = fake_urlopen(monkeypatch, {url: gzip.compress(idx_bytes(labels))})
    x, y = load_mnist(tmp_path, download=True)
    assert requested == [url]
    assert torch.equal(x[:, 0], as_float(images)) and torch.equal(y, torch.from_numpy(labels).long())
    assert sorted(os.listdir(tmp_path)) == ["train-images-idx3-ubyte", "train-labels-idx1-ubyte.gz"]


def test_offline_download_says_so_and_leaves_nothing_behind(tmp_path, monkeypatch):
    fake_urlopen(monkeypatch, {})
    with pytest.raises(ConnectionError, match="seems to be offline") as raised:
        load_mnist(tmp_path / "mnist", download=True)
    assert f"put train-images-idx3-ubyte.gz from {MNIST_URL} in {tmp_path / 'mnist'}/" in str(raised.value)
    with pytest.raises(ConnectionError, match=f"extract cifar-10-python.tar.gz from {CIFAR10_URL} into {tmp_path}/"):
        load_cifar10(tmp_path, download=True)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


# ----------------------------------------------------------------------------------------- CIFAR10


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_python_batches_exactly(tmp_path, protocol):
    batches = write_cifar(tmp_path, (*TRAIN_BATCHES, "test_batch"), protocol)
    for train, names in ((True, TRAIN_BATCHES), (False, ("test_batch",))):
        x, y = load_cifar10(tmp_path, train=train)
        data = np.concatenate([batches[n][b"data"] for n in names])
        assert x.shape == (len(data), 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        # rows hold the red, then green, then blue 32×32 plane, each row-major
        assert torch.equal(x, as_float(data).view(-1, 3, 32, 32))
        assert torch.equal(x[0, 1, 0, 2], as_float(data[0, 1024 + 2 : 1024 + 3])[0])
        assert y.tolist() == sum((batches[n][b"labels"] for n in names), [])


def test_cifar10_reads_numpy1_pickles(tmp_path):
    """Files written under numpy 1 (as the distributed ones) name numpy.core.multiarray, not numpy._core."""
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    batch = cifar_batch(3, seed=7)
    legacy = pickle.dumps(batch, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n" in legacy
    (directory / "test_batch").write_bytes(legacy)
    x, y = load_cifar10(tmp_path, train=False)
    assert torch.equal(x.flatten(1), as_float(batch[b"data"])) and y.tolist() == batch[b"labels"]


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize(
    "content, message",
    [
        (pickle.dumps({b"data": _Payload(), b"labels": []}), "refusing to load posix.getcwd"),
        (pickle.dumps({b"labels": [1]}), "expected a dict with keys b'data' and b'labels'"),
        (pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [1, 2]}),
         r"uint8 array of shape \[N, 3072\]; found uint8 array of shape \(2, 1024\)"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}),
         r"2 images but labels of shape \(1,\)"),
        (b"not a pickle", "is not a CIFAR10 python batch"),
    ],
    ids=["code", "keys", "shape", "labels", "garbage"],
)
def test_cifar10_rejects_foreign_pickles_without_running_them(tmp_path, content, message):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    (directory / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_cifar10(tmp_path, train=False)


def test_missing_cifar10_says_which_files_to_put_where(tmp_path):
    write_cifar(tmp_path, TRAIN_BATCHES[:3])
    with pytest.raises(FileNotFoundError) as raised:
        load_cifar10(tmp_path, train=True)
    message = str(raised.value)
    assert f"not found in {tmp_path / 'cifar-10-batches-py'}/: missing data_batch_4, data_batch_5." in message
    assert CIFAR10_URL in message and "--download" in message


def test_cifar10_download_extracts_only_the_batches(tmp_path, monkeypatch):
    batches = {n: cifar_batch(2, seed=i) for i, n in enumerate((*TRAIN_BATCHES, "test_batch"))}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        def add(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, target: str = "") -> None:
            member = tarfile.TarInfo(name)
            member.type, member.linkname, member.size = kind, target, len(data)
            tar.addfile(member, io.BytesIO(data))

        for n, batch in batches.items():
            add(f"cifar-10-batches-py/{n}", pickle.dumps(batch))
        add("cifar-10-batches-py/../../escaped", b"outside")  # path traversal: must be ignored
        add("cifar-10-batches-py/readme.html", b"<html>")
        add("cifar-10-batches-py/link", b"", tarfile.SYMTYPE, "/etc/passwd")
    root = tmp_path / "data"
    fake_urlopen(monkeypatch, {CIFAR10_URL: archive.getvalue()})
    x, y = load_cifar10(root, train=False, download=True)
    assert torch.equal(x.flatten(1), as_float(batches["test_batch"][b"data"]))
    assert sorted(os.listdir(root / "cifar-10-batches-py")) == sorted(batches)
    assert os.listdir(root) == ["cifar-10-batches-py"]  # archive removed after extraction
    assert not (tmp_path / "escaped").exists()
    assert load_cifar10(root, train=True)[0].shape == (10, 3, 32, 32)


# ------------------------------------------------------------------------------------------ shapes


def test_shapes_have_the_promised_form():
    images, labels = make_shapes(53, size=28, seed=1)
    assert images.shape == (53, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (53,) and labels.dtype == torch.int64
    assert 0.0 <= images.min() and images.max() <= 1.0
    counts = torch.bincount(labels, minlength=len(CLASSES))
    assert len(counts) == len(CLASSES) == 5 and counts.max() - counts.min() <= 1
    assert make_shapes(0)[0].shape == (0, 1, 32, 32)


def test_shapes_are_deterministic_per_seed():
    a, b, c = make_shapes(40, seed=3), make_shapes(40, seed=3), make_shapes(40, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_rotate_rotates_the_same_samples():
    upright, up_labels = make_shapes(40, seed=5)
    rotated, rot_labels = make_shapes(40, seed=5, rotate=True)
    assert torch.equal(up_labels, rot_labels)
    assert not torch.equal(upright, rotated)
    ink = upright.sum(dim=(1, 2, 3)), rotated.sum(dim=(1, 2, 3))
    assert ((ink[0] - ink[1]).abs() / ink[0]).max() < 0.1  # the same glyph and noise, turned: as much ink


def test_classes_are_orientation_sensitive_unless_rotated():
    """Upright class means change under rot90 (orientation is visible); rotate=True means barely do."""

    def asymmetry(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per class: |mean - rot90(mean)| / |mean| of the class's mean image."""
        means = torch.stack([images[labels == k].mean(0) for k in range(len(CLASSES))])
        turned = torch.rot90(means, 1, dims=(-2, -1))
        return (means - turned).flatten(1).norm(dim=1) / means.flatten(1).norm(dim=1)

    assert asymmetry(*make_shapes(1000, seed=0)).min() > 0.6  # measured: 0.81 … 1.22
    assert asymmetry(*make_shapes(1000, seed=0, rotate=True)).max() < 0.3  # measured: 0.11 … 0.18


def test_shapes_reject_bad_arguments():
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_shapes(-1)
    with pytest.raises(ValueError, match="at least 8 pixels"):
        make_shapes(4, size=6)
