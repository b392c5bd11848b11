"""Your own data (dpsgs.job.user_data): every accepted form gives the same run bit for bit, and
every refusal is one line naming what was given and what is accepted."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset, TensorDataset

from dpsgs.config import TrainConfig
from dpsgs.job.data import Dataset
from dpsgs.job.run_setup import load
from dpsgs.job.simulate import simulate
from dpsgs.job.user_data import ACCEPTED, as_datasets


def _tensors(n, seed, f=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g)
    y = (x @ torch.randn(f, classes, generator=torch.Generator().manual_seed(99))).argmax(1)
    return x, y


class Pairs(TorchDataset):
    """A map-style dataset of (input, label) items, labels as Python ints."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].clone(), int(self.y[i])


def _forms():
    (xa, ya), (xb, yb) = _tensors(192, 0), _tensors(48, 1)
    return {
        "pair": ((xa, ya), (xb, yb)),
        "tensordataset": (TensorDataset(xa, ya), TensorDataset(xb, yb)),
        "map-style": (Pairs(xa, ya), Pairs(xb, yb)),
        "dpsgs": (Dataset(xa, ya, 3, "toy"), Dataset(xb, yb, 3, "toy")),
        "mixed": ((xa, ya), Pairs(xb, yb)),
    }


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def test_every_form_trains_to_bit_identical_numbers():
    cfg = dict(stages=2, replicas=2, split=[2], epochs=2, batch_size=16, lr=0.05, dtype="float64",
               device="cpu", progress=False)
    runs = {}
    for name, data in _forms().items():
        s = simulate(TrainConfig(**cfg), model=_model(), data=data)
        runs[name] = (s["test_loss"], s["test_accuracy"], s["final_train_loss"] if "final_train_loss" in s
                      else None, s["dataset"])
    losses = {name: r[:3] for name, r in runs.items()}
    assert len(set(losses.values())) == 1, losses
    assert 0.0 < runs["pair"][0] < 1.1            # it trained (3 classes: chance loss ~1.1)
    assert runs["pair"][3] == "tensors (given)" and runs["map-style"][3] == "Pairs (given)"
    assert runs["tensordataset"][3] == "TensorDataset (given)" and runs["dpsgs"][3] == "toy (given)"


def test_forms_give_the_users_tensors_unchanged():
    (xa, ya), (xb, yb) = _tensors(20, 0), _tensors(8, 1)
    train, test = as_datasets(((xa, ya), TensorDataset(xb, yb)))
    assert train.x is xa and train.y is ya and test.x is xb          # no copy, no cast
    assert train.num_classes == test.num_classes == int(max(ya.max(), yb.max())) + 1
    h = xa.half()
    train, _ = as_datasets(((h, ya.int()), (xb.half(), yb)), num_classes=7)
    assert train.x is h and train.x.dtype == torch.float16       # cast per batch, not here
    assert train.y.dtype == torch.int64 and torch.equal(train.y, ya) and train.num_classes == 7
    given = Dataset(xa, ya, 5, "mine", augment=True, fill=(0.5,))
    train, _ = as_datasets((given, (xb, yb)))
    assert train is not given and (train.augment, train.fill, train.num_classes) == (True, (0.5,), 5)
    assert given.num_classes == 5 and train.x is xa               # the user's object is not touched


def test_map_style_items_may_be_numpy_and_tensor_labels():
    class Np(TorchDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return np.full((2, 2), i, dtype=np.float32), torch.tensor(i % 2)

    train, _ = as_datasets((Np(), Np()))
    assert train.x.shape == (4, 2, 2) and train.x.dtype == torch.float32
    assert train.y.tolist() == [0, 1, 0, 1] and train.num_classes == 2


def _refusal(data, num_classes=None) -> str:
    with pytest.raises(ValueError) as e:
        as_datasets(data, num_classes)
    text = str(e.value)
    assert "\n" not in text
    return text


def test_refusals_name_what_was_given_and_what_is_accepted():
    (x, y), (xt, yt) = _tensors(10, 0), _tensors(4, 1)
    assert _refusal([1, 2, 3]) == f"data= takes (train, test), got a list of 3; each of them is {ACCEPTED}"
    assert _refusal((x, y)) == ("data= takes (train, test), got a pair of tensors: pass "
                                "data=((x_train, y_train), (x_test, y_test))")
    assert _refusal(({"x": x}, (xt, yt))) == f"data= train: got a builtins.dict; accepted: {ACCEPTED}"
    assert _refusal(((x.numpy(), y), (xt, yt))) == (
        "data= train: got a tuple of (a NumPy array (float32, shape (10, 6)), a torch.int64 tensor "
        f"of shape (10,)); accepted: {ACCEPTED}")

    class Stream(IterableDataset):
        def __iter__(self):
            return iter([])

    assert _refusal(((x, y), Stream())).startswith("data= test: a test_user_data.Stream")
    assert "is an iterable-style Dataset (no len() and [i])" in _refusal(((x, y), Stream()))
    assert _refusal((TensorDataset(x, y, y), (xt, yt))) == \
        "data= train: a TensorDataset of 3 tensors; it must hold exactly two, (inputs, labels)"


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x, y.float()), "data= train (tensors): labels are torch.float32; they must be "
                                  "integer class ids (0..num_classes-1), e.g. y.long() if they are whole numbers"),
    (lambda x, y: (x, y.bool()), "labels are torch.bool; they must be integer class ids"),
    (lambda x, y: (x, y[:, None]), "data= train (tensors): labels of shape (10, 1); they must be one "
                                   "class id per sample, shape (N,)"),
    (lambda x, y: (x, y[:9]), "data= train (tensors): 10 inputs but 9 labels"),
    (lambda x, y: (x[:, 0], y), "data= train (tensors): inputs of shape (10,); they must be N x (one "
                                "sample's shape), e.g. N x features"),
    (lambda x, y: (x > 0, y), "data= train (tensors): inputs are torch.bool; they must be a floating "
                              "or integer dtype (cast to the run's --dtype as they are fed)"),
    (lambda x, y: (x[:0], y[:0]), "data= train (tensors): no samples"),
])
def test_bad_tensors_are_refused(bad, message):
    (x, y), test = _tensors(10, 0), _tensors(4, 1)
    assert message in _refusal((bad(x, y), test))


def test_bad_labels_and_shapes():
    (x, y), (xt, yt) = _tensors(10, 0), _tensors(4, 1)
    neg = y.clone()
    neg[3] = -1
    assert _refusal(((x, neg), (xt, yt))) == ("train data 'tensors': label -1 of sample 3 is not a "
                                              "class id in 0..2 (num_classes 3 = the largest label + 1)")
    assert _refusal(((x, y), (xt, yt)), num_classes=2).startswith(
        "train data 'tensors': label 2 of sample ")
    assert _refusal(((x, y), (xt[:, :5], yt))) == ("data=: train samples have shape (6,) but test "
                                                    "samples (5,): both must have one shape")


def test_bad_map_style_items():
    class Items(TorchDataset):
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    x = torch.zeros(3)
    ok = Items([(x, 0)])
    assert _refusal((Items([(x, 0), x]), ok)) == ("data= train (Items): item 1 is a torch.float32 "
                                                  "tensor of shape (3,); each item must be a pair (input, label)")
    assert _refusal((Items([(x, 0), (torch.zeros(4), 1)]), ok)) == (
        "data= train (Items): item 1's input is torch.float32 (4,) but item 0's torch.float32 (3,): "
        "inputs must have one shape and dtype")
    assert _refusal((Items([(x, 1.0)]), ok)) == ("data= train (Items): item 0's label is 1.0 (a "
                                                 "builtins.float); labels must be integer class ids "
                                                 "(0..num_classes-1)")
    assert _refusal((Items([([0.0, 1.0, 2.0], 0)]), ok)) == (
        "data= train (Items): item 0's input is a list of 3; it must be a tensor (or a NumPy "
        "array), e.g. through a transform")
    assert _refusal((Items([]), ok)) == "data= train (Items): no samples"


def test_built_in_data_labels_checked_against_num_classes():
    with pytest.raises(ValueError) as e:
        load(TrainConfig(num_classes=5))
    assert str(e.value) == ("train data 'digits': label 7 of sample 0 is not a class id in 0..4 "
                            "(num_classes 5 as set)")


def test_data_dir_is_read_by_cifar10_only():
    from dpsgs.job.data import check_dataset

    with pytest.raises(ValueError, match=re.escape(
            "--data-dir /x: --dataset digits reads no folder (only --dataset cifar10 does); "
            "drop --data-dir or name the dataset")):
        check_dataset("digits", "/x")
    with pytest.raises(ValueError, match=re.escape(
            "--data-dir /x: this run's data comes from data=, nothing reads the folder; drop data_dir")):
        load(TrainConfig(data_dir="/x"), data=(_tensors(40, 0), _tensors(8, 1)))
