"""Datasets and the sampler: real digits, a CIFAR folder written here in the exact pickle
format, synthetic data, determinism of batches and augmentation, and error messages."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsgs.job.data import (CIFAR10_MEAN, CIFAR10_STD, BatchSampler, augment_crop_flip, get_batch,
                        load_dataset)


def write_cifar(root: Path, per_file: int = 4, skip: str | None = None) -> np.ndarray:
    """A tiny CIFAR-10 folder in the official python format; returns the first file's data."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name == skip:
            continue
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_file)]
        first = data if first is None else first
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_file}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per_file}, f)
    return first


def test_digits_split_and_scaling() -> None:
    train, test = load_dataset("digits")
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert abs(train.x.mean().item()) < 1e-5 and abs(train.x.std().item() - 1) < 1e-4
    assert train.num_classes == 10 and set(test.y.tolist()) == set(range(10))
    again, _ = load_dataset("digits", seed=123)   # the split does not depend on the run seed
    assert torch.equal(again.x, train.x)


def test_digits_read_without_sklearn_equal_sklearns_own_loader() -> None:
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from dpsgs.job.data import _digits_arrays

    pixels, labels = _digits_arrays()
    bunch = load_digits()
    assert pixels.dtype == bunch.data.dtype and np.array_equal(pixels, bunch.data)
    assert np.array_equal(labels, bunch.target) and labels.shape == (1797,)
    # the point of reading the file: a rank loading digits never imports scikit-learn
    code = ("import sys; from dpsgs.job.data import load_dataset; load_dataset('digits'); "
            "sys.exit('sklearn' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cifar_folder_loads_and_normalises(tmp_path: Path) -> None:
    first = write_cifar(tmp_path / "cifar")
    train, test = load_dataset("cifar10", str(tmp_path / "cifar"))
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    assert train.augment and not test.augment
    # pixel (c=1, row 2, col 5) of the first image: CHW order inside the 3072 bytes
    raw = first[0].reshape(3, 32, 32)[1, 2, 5] / 255.0
    assert train.x[0, 1, 2, 5].item() == pytest.approx((raw - CIFAR10_MEAN[1]) / CIFAR10_STD[1],
                                                       abs=1e-6)
    # the parent folder of the official tarball works too
    write_cifar(tmp_path / "top" / "cifar-10-batches-py")
    assert len(load_dataset("cifar10", str(tmp_path / "top"))[0]) == 20


def test_cifar_errors_name_the_fault(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("cifar10", None)
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        load_dataset("cifar10", str(tmp_path / "nowhere"))
    write_cifar(tmp_path / "c", skip="data_batch_3")
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        load_dataset("cifar10", str(tmp_path / "c"))
    write_cifar(tmp_path / "t")
    blob = (tmp_path / "t" / "data_batch_2").read_bytes()
    (tmp_path / "t" / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="data_batch_2' is not a readable pickle"):
        load_dataset("cifar10", str(tmp_path / "t"))
    write_cifar(tmp_path / "k")
    with open(tmp_path / "k" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match=r"test_batch' has no key b'labels'"):
        load_dataset("cifar10", str(tmp_path / "k"))
    with open(tmp_path / "k" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"test_batch'.*uint8 N x 3072.*\(2, 100\)"):
        load_dataset("cifar10", str(tmp_path / "k"))


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits, cifar10, synthetic"):
        load_dataset("mnist")


def test_synthetic_is_seeded_and_learnable() -> None:
    a, at = load_dataset("synthetic", synthetic_shape=(2, 3, 4), synthetic_samples=64, seed=1)
    b, _ = load_dataset("synthetic", synthetic_shape=[2, 3, 4], synthetic_samples=64, seed=1)
    c, _ = load_dataset("synthetic", synthetic_shape=(2, 3, 4), synthetic_samples=64, seed=2)
    assert a.x.shape == (64, 2, 3, 4) and at.x.shape == (16, 2, 3, 4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    assert a.y.min() >= 0 and a.y.max() < 10 and len(set(a.y.tolist())) > 3


def test_sampler_partitions_each_epoch() -> None:
    s = BatchSampler(100, batch_size=8, replicas=3, seed=5)
    assert s.batches_per_epoch == 4                        # 100 // 24, tail dropped
    seen = torch.cat([s.indices(0, j, r) for j in range(4) for r in range(3)])
    assert len(set(seen.tolist())) == 96                   # no sample twice in an epoch
    # the documented layout: global batch j = perm rows [j*N*B, (j+1)*N*B), replica slice r
    perm = s.permutation(1)
    assert torch.equal(s.indices(1, 2, 1), perm[2 * 24 + 8: 2 * 24 + 16])
    assert not torch.equal(s.permutation(0), perm)         # reshuffled per epoch
    fresh = BatchSampler(100, batch_size=8, replicas=3, seed=5)
    assert torch.equal(fresh.indices(1, 2, 1), s.indices(1, 2, 1))   # pure function


def test_sampler_keep_last_wraps_and_errors() -> None:
    s = BatchSampler(10, batch_size=4, replicas=1, seed=0, drop_last=False, shuffle=False)
    assert s.batches_per_epoch == 3
    assert s.indices(0, 2, 0).tolist() == [8, 9, 0, 1]
    with pytest.raises(ValueError,
                       match="10 samples is smaller than one global batch.*4 x replicas 3 = 12"):
        BatchSampler(10, batch_size=4, replicas=3, seed=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        BatchSampler(10, batch_size=0, replicas=1, seed=0)
    with pytest.raises(IndexError, match="batch 3 out of range.*3 batches"):
        s.indices(0, 3, 0)


def test_get_batch_augmentation_is_keyed(tmp_path: Path) -> None:
    write_cifar(tmp_path / "c", per_file=8)
    train, test = load_dataset("cifar10", str(tmp_path / "c"))
    s = BatchSampler(len(train), batch_size=4, replicas=2, seed=7)
    x1, y1 = get_batch(train, s, 0, 1, 1)
    x2, y2 = get_batch(train, BatchSampler(len(train), 4, 2, seed=7), 0, 1, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(get_batch(train, s, 1, 1, 1)[0], x1)
    plain, _ = get_batch(train, s, 0, 1, 1, train=False)
    assert torch.equal(plain, train.x[s.indices(0, 1, 1)]) and not torch.equal(plain, x1)
    # padding is a black pixel after normalisation
    g = torch.Generator().manual_seed(0)
    img = torch.full((64, 3, 4, 4), 5.0)
    out = augment_crop_flip(img, g, pad=4, fill=train.fill)
    fill = torch.tensor(train.fill).view(1, 3, 1, 1)
    assert ((out == 5.0) | (out == fill)).all() and (out == fill).any()


def test_crop_and_flip_move_pixels() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(200, 1, 1, 1)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=1)
    assert any(torch.equal(o[0], x[0, 0].flip(1)) for o in out)      # pure flip happens
    assert any(torch.equal(o[0], x[0, 0]) for o in out)              # identity happens
    assert len({tuple(o.flatten().tolist()) for o in out}) == 18    # 9 crops x 2 flips
    assert set(out.unique().tolist()) == set(range(16))               # 0 doubles as padding
