"""A data file that would run code is refused, naming it, before anything runs (issue 20,
item 12); the real format still loads, from NumPy 1 and 2 writers and every protocol."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from dpsgs.job.data import load_dataset
from dpsgs.job.safe_pickle import UnsafePickle, load_restricted

from test_data import write_cifar


class _RunsCode:
    """Unpickling this calls os.system: what a crafted data file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_file_is_refused_naming_it_and_runs_nothing(tmp_path: Path) -> None:
    write_cifar(tmp_path / "c")
    marker = tmp_path / "code-ran"
    bad = tmp_path / "c" / "data_batch_3"
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4,
                     b"batch_label": _RunsCode(marker)}, f)
    pickle.loads(bad.read_bytes())          # the file is live: plain pickle runs its code
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError) as e:
        load_dataset("cifar10", str(tmp_path / "c"))
    assert not marker.exists(), "the crafted file ran its code"
    message = str(e.value)
    assert message.startswith(f"CIFAR-10 file {str(bad)!r} is refused: it refers to ")
    assert "system, which a data file never holds (refused without running it)" in message
    assert "\n" not in message


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_the_format_loads_at_every_protocol(tmp_path: Path, protocol: int) -> None:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    obj = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 9], b"data": data,
           b"filenames": [b"a.png", "b.png"], b"num": 10000, b"ratio": 0.5}
    path = tmp_path / "f"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    got = load_restricted(path)
    assert got.keys() == obj.keys() and np.array_equal(got[b"data"], data)
    assert got[b"data"].dtype == np.uint8 and got[b"labels"] == [3, 9]
    assert got[b"filenames"] == [b"a.png", "b.png"] and got[b"num"] == 10000


def test_a_numpy_1_file_loads(tmp_path: Path) -> None:
    # what the official CIFAR-10 files name (written by NumPy 1 under Python 2)
    blob = pickle.dumps({b"data": np.ones((1, 3072), np.uint8)}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "f").write_bytes(blob)
    assert load_restricted(tmp_path / "f")[b"data"].sum() == 3072


def test_any_other_global_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(pickle.dumps({b"x": Path("/etc")}))
    with pytest.raises(UnsafePickle, match="refers to pathlib.*PosixPath"):
        load_restricted(path)
