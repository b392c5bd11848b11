"""Datasets (digits, CIFAR-10, synthetic) and the deterministic per-replica batch sampler.

Every batch is a pure function of (seed, epoch, batch, replica): stage 0 (which needs the
inputs), the last stage (which needs the labels) and the single-process reference all call
`get_batch` with the same arguments and get identical tensors, so labels never travel
through the pipeline.

- digits: scikit-learn's 1797 handwritten 8x8 digits (shipped with the package), as
  1 x 8 x 8 images, pixel/16 then standardised with the train set's mean and std; a fixed
  split (seed 0, independent of the training seed) of 1437 train / 360 test.
- cifar10: a local folder in the standard python-pickle format (data_batch_1..5,
  test_batch; batches.meta is not needed), normalised with the CIFAR-10 channel mean/std;
  train batches are augmented (random crop 32 with padding 4, horizontal flip). Held as
  float32: ~615 MB for the train set in every process that loads it. The pickle files are
  read with a restricted unpickler (dpsgs.job.safe_pickle): a file that would run code is
  refused, naming it.
- synthetic: Gaussian inputs of any shape with labels from a fixed random linear teacher,
  so the task is learnable; test set = a quarter as many samples from the same teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASET_NAMES", "CIFAR10_MEAN", "CIFAR10_STD", "Dataset", "BatchSampler",
           "load_dataset", "check_dataset", "get_batch", "augment_crop_flip"]

DATASET_NAMES: list[str] = ["digits", "cifar10", "synthetic"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST_FILES = ["test_batch"]
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST = 360


@dataclass
class Dataset:
    x: torch.Tensor          # float32, N x C x H x W (or N x F)
    y: torch.Tensor          # int64, N
    num_classes: int
    name: str
    augment: bool = False    # train CIFAR: random crop 32 pad 4 + horizontal flip
    fill: tuple[float, ...] | None = None   # per-channel value of a black pixel (crop padding)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def load_dataset(name: str, data_dir: str | None = None,
                 synthetic_shape: tuple[int, ...] | list[int] = (3, 32, 32),
                 synthetic_samples: int = 4096, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Return (train, test) for `name` in DATASET_NAMES; ValueError/FileNotFoundError that
    name the folder, file or key at fault."""
    check_dataset(name, data_dir)
    if name == "digits":
        return _digits()
    if name == "cifar10":
        return _cifar10(data_dir)
    return _synthetic(tuple(synthetic_shape), synthetic_samples, seed)


def check_dataset(name: str, data_dir: str | None = None) -> None:
    """The cheap checks of load_dataset (name, folder, files) without reading any data, so a
    launcher can fail before starting MPI work."""
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    if name == "cifar10":
        _cifar_root(data_dir)
    elif data_dir:           # a folder nothing reads: the user meant another dataset
        raise ValueError(f"--data-dir {data_dir}: --dataset {name} reads no folder (only "
                         f"--dataset cifar10 does); drop --data-dir or name the dataset")


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (pixels N x 64, labels N), read from the file it ships
    (datasets/data/digits.csv.gz: 64 pixel columns, then the label), as its load_digits
    does: importing scikit-learn costs seconds on every rank, the file a few milliseconds.
    Its own loader where the file is not there (a layout this one does not know)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")       # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data, bunch.target


def _digits() -> tuple[Dataset, Dataset]:
    pixels, labels = _digits_arrays()
    x = torch.tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    test_idx, train_idx = perm[:_DIGITS_TEST], perm[_DIGITS_TEST:]
    # Scalar statistics: a few border pixels are constant, per-pixel std would divide by 0.
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    return (Dataset(x[train_idx].contiguous(), y[train_idx].contiguous(), 10, "digits"),
            Dataset(x[test_idx].contiguous(), y[test_idx].contiguous(), 10, "digits"))


def _cifar_root(data_dir: str | None) -> Path:
    if not data_dir:
        raise ValueError("dataset 'cifar10' needs --data-dir: a folder with the python "
                         "version of CIFAR-10 (data_batch_1..5, test_batch)")
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():   # the folder the official tarball unpacks to
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {str(root)!r} does not exist")
    missing = [f for f in _CIFAR_TRAIN_FILES + _CIFAR_TEST_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {str(root)!r} lacks {', '.join(missing)} "
                                f"(expected the python-pickle files data_batch_1..5, test_batch)")
    return root


def _cifar10(data_dir: str | None) -> tuple[Dataset, Dataset]:
    root = _cifar_root(data_dir)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    fill = tuple(float(v) for v in (-mean / std).flatten())

    def load(files: list[str], augment: bool) -> Dataset:
        parts = [_read_cifar_file(root / f) for f in files]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        x = (x.reshape(-1, 3, 32, 32).float().div_(255.0) - mean) / std
        return Dataset(x.contiguous(), y, 10, "cifar10", augment=augment, fill=fill)

    return load(_CIFAR_TRAIN_FILES, True), load(_CIFAR_TEST_FILES, False)


def _read_cifar_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from dpsgs.job.safe_pickle import UnsafePickle, load_restricted

    try:
        d = load_restricted(path)
    except UnsafePickle as e:
        raise ValueError(f"CIFAR-10 file {str(path)!r} is refused: {e}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"CIFAR-10 file {str(path)!r} is not a readable pickle: "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"CIFAR-10 file {str(path)!r} holds a {type(d).__name__}, "
                         f"expected a dict with keys b'data' and b'labels'")
    for key in (b"data", b"labels"):
        if key not in d:
            raise ValueError(f"CIFAR-10 file {str(path)!r} has no key {key!r} "
                             f"(keys: {sorted(d)})")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR-10 file {str(path)!r}: key b'data' must be uint8 N x 3072, "
                         f"got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR-10 file {str(path)!r}: key b'labels' has {labels.size} "
                         f"entries for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 file {str(path)!r}: labels outside 0..9 "
                         f"(min {labels.min()}, max {labels.max()})")
    return data, labels


def _synthetic(shape: tuple[int, ...], samples: int, seed: int,
               num_classes: int = 10) -> tuple[Dataset, Dataset]:
    if not shape or any(int(s) < 1 for s in shape):
        raise ValueError(f"synthetic dataset: bad sample shape {shape}")
    if samples < 1:
        raise ValueError(f"synthetic dataset: synthetic_samples must be >= 1, got {samples}")
    g = torch.Generator().manual_seed(seed)
    features = math.prod(shape)
    teacher = torch.randn(features, num_classes, generator=g)

    def make(n: int) -> Dataset:
        x = torch.randn(n, *shape, generator=g)
        y = (x.reshape(n, -1) @ teacher).argmax(dim=1)
        return Dataset(x, y, num_classes, "synthetic")

    return make(samples), make(max(samples // 4, 1))


class BatchSampler:
    """Global batch j of an epoch = rows [j*N*B, (j+1)*N*B) of a permutation seeded by
    (seed, epoch); replica r takes the slice [r*B, (r+1)*B).

    drop_last=True drops the partial tail; drop_last=False keeps every batch full by wrapping
    around to the start of the permutation (a few samples are seen twice in that epoch), so
    shapes never change mid-run. shuffle=False uses the identity order (evaluation).
    """

    def __init__(self, num_samples: int, batch_size: int, replicas: int, seed: int,
                 drop_last: bool = True, shuffle: bool = True) -> None:
        for what, v in (("num_samples", num_samples), ("batch_size", batch_size),
                        ("replicas", replicas)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BatchSampler: {what} must be a positive int, got {v!r}")
        self.num_samples, self.batch_size, self.replicas = num_samples, batch_size, replicas
        self.seed, self.drop_last, self.shuffle = int(seed), drop_last, shuffle
        global_batch = batch_size * replicas
        self.batches_per_epoch = (num_samples // global_batch if drop_last
                                  else -(-num_samples // global_batch))
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {num_samples} samples is smaller than one global batch "
                             f"(batch_size {batch_size} x replicas {replicas} = {global_batch}); "
                             f"lower --batch-size or use more data")
        self._cached: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        self._cached = (epoch, perm)
        return perm

    def indices(self, epoch: int, batch: int, replica: int) -> torch.Tensor:
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} out of range: an epoch has "
                             f"{self.batches_per_epoch} batches")
        if not 0 <= replica < self.replicas:
            raise IndexError(f"replica {replica} out of range: {self.replicas} replicas")
        start = (batch * self.replicas + replica) * self.batch_size
        pos = torch.arange(start, start + self.batch_size) % self.num_samples
        return self.permutation(epoch)[pos]


def get_batch(ds: Dataset, sampler: BatchSampler, epoch: int, batch: int, replica: int,
              train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of replica `replica`'s share of global batch `batch` in `epoch`; augmented (for a
    dataset with augment=True and train=True) with randomness keyed by
    (sampler.seed, epoch, batch, replica) only."""
    if len(ds) != sampler.num_samples:
        raise ValueError(f"sampler built for {sampler.num_samples} samples, dataset "
                         f"{ds.name!r} has {len(ds)}")
    idx = sampler.indices(epoch, batch, replica)
    x, y = ds.x[idx], ds.y[idx]
    if train and ds.augment:
        g = torch.Generator().manual_seed(_mix(sampler.seed, epoch, batch, replica, 1))
        x = augment_crop_flip(x, g, fill=ds.fill)
    return x, y


def augment_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4,
                      fill: tuple[float, ...] | None = None) -> torch.Tensor:
    """Random crop of the original size from the image padded by `pad` (padding = `fill` per
    channel, 0 if None) and a horizontal flip with probability 1/2, per sample."""
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    padded = x.new_empty(n, c, h + 2 * pad, w + 2 * pad)
    if fill is None:
        padded.zero_()
    else:
        padded.copy_(torch.tensor(fill, dtype=x.dtype).view(1, c, 1, 1).expand_as(padded))
    padded[:, :, pad:pad + h, pad:pad + w] = x
    rows = offsets[:, :1] + torch.arange(h)                       # n x h
    cols = offsets[:, 1:] + torch.arange(w)                       # n x w
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def _mix(*keys: int) -> int:
    """A 63-bit seed from integer keys (NumPy's SeedSequence: no collisions between keys)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(
        2, dtype=np.uint64)[0] >> np.uint64(1))
