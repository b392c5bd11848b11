"""Your own data: the forms `dpsgs.train(config, comm, data=(train, test))` accepts, checked.

Each of train and test may be
- a pair of tensors `(x, y)`: x holds N samples of one shape (N x ...), y N class ids;
- a `torch.utils.data.TensorDataset(x, y)` (its two tensors, used as they are);
- any map-style `torch.utils.data.Dataset` (`len()` and `[i]`) whose items are `(input,
  label)`: read once, in index order, into one tensor of inputs and one of labels;
- a `dpsgs.job.data.Dataset` (what the built-in datasets are).
The same samples in any of these forms train to bit-identical numbers.

What is checked, each refusal one line naming what was given: labels are integer class ids
(any integer dtype, used as int64; never a float, however whole) in 0..num_classes-1, one per
sample; inputs are real numbers (a floating or integer dtype) of one shape, the same in train
and test. num_classes is config.num_classes when set, else the largest label + 1. Nothing is
changed otherwise: inputs keep their dtype here and are cast to the run's dtype (--dtype) as
each batch is fed to the model, which is the one conversion dpsgs makes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset, TensorDataset

from dpsgs.job.data import Dataset

__all__ = ["ACCEPTED", "as_datasets", "check_labels"]

ACCEPTED = ("a pair of tensors (x, y), a torch TensorDataset(x, y), a map-style torch "
            "Dataset of (input, label) items, or a dpsgs.job.data.Dataset")


def as_datasets(data: Any, num_classes: int | None = None) -> tuple[Dataset, Dataset]:
    """(train, test) as dpsgs Datasets from `data` = (train, test) in the forms above;
    ValueError (one line) for anything else."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"data= takes (train, test), got {_what(data)}; each of them is {ACCEPTED}")
    if all(isinstance(d, torch.Tensor) for d in data):
        raise ValueError("data= takes (train, test), got a pair of tensors: pass "
                         "data=((x_train, y_train), (x_test, y_test))")
    train, test = (_part(d, which) for d, which in zip(data, ("train", "test")))
    if train.sample_shape != test.sample_shape:
        raise ValueError(f"data=: train samples have shape {train.sample_shape} but test samples "
                         f"{test.sample_shape}: both must have one shape")
    # a dpsgs Dataset says how many classes it has; other forms say it by their labels
    declared = [d.num_classes for d in (data[0], data[1]) if isinstance(d, Dataset)]
    if num_classes is not None:
        classes, source = num_classes, "as set"
    elif declared:
        classes, source = max(declared), "as the dataset declares"
    else:
        classes, source = int(max(train.y.max(), test.y.max())) + 1, "= the largest label + 1"
    train, test = (dataclasses.replace(d, num_classes=classes) for d in (train, test))
    check_labels(train, "train", classes, source)
    check_labels(test, "test", classes, source)
    return train, test


def check_labels(ds: Dataset, which: str, num_classes: int, source: str = "as set") -> None:
    """Every label of `ds` is a class id below `num_classes` (a model with that many outputs
    can score it); ValueError naming the first label that is not (and, by `source`, where
    num_classes came from)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    y = ds.y
    if len(y) == 0:
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        bad = int(torch.nonzero((y < 0) | (y >= num_classes))[0, 0])
        raise ValueError(f"{which} data {ds.name!r}: label {int(y[bad])} of sample {bad} is not a "
                         f"class id in 0..{num_classes - 1} (num_classes {num_classes} {source})")


def _what(obj: Any) -> str:
    """How a refusal names what it was given: the type, and a tensor's dtype and shape."""
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, np.ndarray):
        return f"a NumPy array ({obj.dtype}, shape {obj.shape})"
    if isinstance(obj, (tuple, list)):
        if 0 < len(obj) <= 2:
            return f"a {type(obj).__name__} of ({', '.join(_what(o) for o in obj)})"
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__module__}.{type(obj).__name__}"


def _part(d: Any, which: str) -> Dataset:
    """One of train/test as a dpsgs Dataset (a given one is kept, its labels as int64)."""
    if isinstance(d, Dataset):
        x, y = _checked(d.x, d.y, which, d.name)
        return d if y is d.y else dataclasses.replace(d, y=y)
    if isinstance(d, TensorDataset):
        if len(d.tensors) != 2:
            raise ValueError(f"data= {which}: a TensorDataset of {len(d.tensors)} tensors; "
                             f"it must hold exactly two, (inputs, labels)")
        return Dataset(*_checked(*d.tensors, which, "TensorDataset"), 0, "TensorDataset")
    if isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(t, torch.Tensor) for t in d):
        return Dataset(*_checked(d[0], d[1], which, "tensors"), 0, "tensors")
    if isinstance(d, IterableDataset) or (isinstance(d, TorchDataset) and not hasattr(d, "__len__")):
        raise ValueError(f"data= {which}: {_what(d)} is an iterable-style Dataset (no len() and "
                         f"[i]); accepted: {ACCEPTED}")
    if isinstance(d, TorchDataset):
        return Dataset(*_read_items(d, which, type(d).__name__), 0, type(d).__name__)
    raise ValueError(f"data= {which}: got {_what(d)}; accepted: {ACCEPTED}")


def _checked(x: Any, y: Any, which: str, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"data= {which} ({form})"
    for name, t in (("inputs", x), ("labels", y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {name} are {_what(t)}; they must be a torch tensor")
    if x.dim() < 2:
        raise ValueError(f"{where}: inputs of shape {tuple(x.shape)}; they must be N x (one "
                         f"sample's shape), e.g. N x features")
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{where}: inputs are {x.dtype}; they must be a floating or integer "
                         f"dtype (cast to the run's --dtype as they are fed)")
    if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{where}: labels are {y.dtype}; they must be integer class ids "
                         f"(0..num_classes-1), e.g. y.long() if they are whole numbers")
    if y.dim() != 1:
        raise ValueError(f"{where}: labels of shape {tuple(y.shape)}; they must be one class "
                         f"id per sample, shape (N,)")
    if len(x) != len(y):
        raise ValueError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{where}: no samples")
    return x, y if y.dtype == torch.int64 else y.to(torch.int64)


def _read_items(d: Sequence[Any], which: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A map-style dataset's items, read in order and stacked (x keeps the items' dtype)."""
    where = f"data= {which} ({name})"
    n = len(d)
    if n == 0:
        raise ValueError(f"{where}: no samples")
    inputs, labels = [], []
    for i in range(n):
        item = d[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"{where}: item {i} is {_what(item)}; each item must be a pair "
                             f"(input, label)")
        x, y = item
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{where}: item {i}'s input is {_what(x)}; it must be a tensor "
                             f"(or a NumPy array), e.g. through a transform")
        if inputs and (x.shape != inputs[0].shape or x.dtype != inputs[0].dtype):
            raise ValueError(f"{where}: item {i}'s input is {x.dtype} {tuple(x.shape)} but item "
                             f"0's {inputs[0].dtype} {tuple(inputs[0].shape)}: inputs must have "
                             f"one shape and dtype")
        inputs.append(x)
        labels.append(_label(y, where, i))
    return _checked(torch.stack(inputs), torch.tensor(labels, dtype=torch.int64), which, name)


def _label(y: Any, where: str, i: int) -> int:
    """An item's label as an int: a Python/NumPy integer or a one-element integer tensor."""
    if isinstance(y, torch.Tensor) and y.numel() == 1 and not (y.dtype.is_floating_point
                                                               or y.dtype == torch.bool or y.is_complex()):
        return int(y)
    if isinstance(y, (int, np.integer)) and not isinstance(y, (bool, np.bool_)):
        return int(y)
    raise ValueError(f"{where}: item {i}'s label is {y!r} ({_what(y)}); labels must be integer "
                     f"class ids (0..num_classes-1)")
