"""Bad input, one test per item of issue 5, checking the message text (pure logic, no MPI).

The multi-rank cases (wrong world size under mpirun, a stage changing its output shape
mid-run, NaN loss in training) are in tests/mpi/test_bad_input.py.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dpsgs.job.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dpsgs.config import TrainConfig
from dpsgs.job.data import BatchSampler, load_dataset
from dpsgs.job.models import build_model
from dpsgs.pipeline.partition import balance, check_split
from dpsgs.comm.grid import Grid


def test_world_size_not_k_times_n():
    with pytest.raises(ValueError) as e:
        Grid(2, 2).check_world(3)
    assert "world size 3 does not match the grid: K*N = 2*2 = 4 ranks needed" in str(e.value)
    assert "mpirun -n 4" in str(e.value)


def test_more_stages_than_layers():
    with pytest.raises(ValueError, match=r"cannot split 3 layers into 4 stages "
                                         r"\(each stage needs at least one layer\)"):
        check_split([1, 2, 3], num_layers=3, stages=4)
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        balance([1.0, 1.0], 3)


@pytest.mark.parametrize("split, message", [
    ([4], r"point 0 = 4 must be in \(0, 4\)"),
    ([0], r"point 0 = 0 must be in \(0, 4\)"),
    ([2, 2], r"point 1 = 2 must be in \(2, 4\)"),
    ([1, 2, 3], "2 stages need 1 split points"),
])
def test_split_points_out_of_range(split, message):
    stages = 3 if split == [2, 2] else 2
    with pytest.raises(ValueError, match=message):
        check_split(split, num_layers=4, stages=stages)


def test_dataset_smaller_than_one_global_batch():
    with pytest.raises(ValueError) as e:
        BatchSampler(num_samples=30, batch_size=16, replicas=2, seed=0)
    assert ("dataset of 30 samples is smaller than one global batch "
            "(batch_size 16 x replicas 2 = 32)") in str(e.value)


def test_variable_last_batch_is_dropped_by_default():
    # 100 samples, global batch 2 x 16 = 32: 3 full batches, the 4-sample tail is dropped,
    # so every step sees the same shapes (no channel header mismatch at epoch end).
    s = BatchSampler(num_samples=100, batch_size=16, replicas=2, seed=0)
    assert s.batches_per_epoch == 3
    assert all(len(s.indices(0, b, r)) == 16 for b in range(3) for r in range(2))
    with pytest.raises(IndexError, match="batch 3 out of range: an epoch has 3 batches"):
        s.indices(0, 3, 0)
    # drop_last=False keeps shapes fixed too: the last batch wraps to the permutation's start
    w = BatchSampler(num_samples=100, batch_size=16, replicas=2, seed=0, drop_last=False)
    assert w.batches_per_epoch == 4 and len(w.indices(0, 3, 1)) == 16
    assert TrainConfig().drop_last is True


def test_unknown_model_and_dataset():
    with pytest.raises(ValueError) as e:
        build_model("resnet999", (3, 32, 32), 10)
    assert "unknown model 'resnet999'; known models: mlp, mlp-wide, resnet20" in str(e.value)
    with pytest.raises(ValueError) as e:
        load_dataset("imagenet")
    assert "unknown dataset 'imagenet'; known datasets: digits" in str(e.value)


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"CIFAR-10 folder '{missing}' does not exist"):
        load_dataset("cifar10", str(missing))
    with pytest.raises(ValueError, match="dataset 'cifar10' needs --data-dir"):
        load_dataset("cifar10", None)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks data_batch_2, data_batch_3"):
        load_dataset("cifar10", str(tmp_path / "half"))


def _cifar_folder(root: Path, first: bytes) -> Path:
    root.mkdir()
    good = pickle.dumps({b"data": torch.zeros(2, 3072, dtype=torch.uint8).numpy(),
                         b"labels": [0, 1]})
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch"]:
        (root / name).write_bytes(first if name == "data_batch_1" else good)
    return root


def test_malformed_data_folder(tmp_path):
    root = _cifar_folder(tmp_path / "garbage", b"this is not a pickle")
    with pytest.raises(ValueError, match="data_batch_1' is not a readable pickle"):
        load_dataset("cifar10", str(root))
    root = _cifar_folder(tmp_path / "nokey", pickle.dumps({b"data": b""}))
    with pytest.raises(ValueError, match="data_batch_1' has no key b'labels'"):
        load_dataset("cifar10", str(root))


@dataclass
class _G:   # what checkpoints use of topology.Grid
    stages: int
    replicas: int

    def coords(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.stages)


def _saved(tmp_path: Path) -> Path:
    st = {"model": torch.nn.Linear(2, 2).double().state_dict(), "step": 3}
    return save_checkpoint(tmp_path, "e1", _G(1, 1), 0, st, {"model": "mlp", "step": 3}, None)


def test_truncated_checkpoint(tmp_path):
    folder = _saved(tmp_path)
    shard = folder / "stage0.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"stage0.pt' is truncated or overwritten: "
                                              r"100 bytes, the manifest says \d+"):
        load_checkpoint(folder, _G(1, 1), 0)


def test_corrupt_checkpoint(tmp_path):
    folder = _saved(tmp_path)
    shard = folder / "stage0.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: its SHA-256 differs"):
        load_checkpoint(folder, _G(1, 1), 0)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json' is corrupt"):
        load_checkpoint(folder, _G(1, 1), 0)


def test_checkpoint_from_other_grid_or_model(tmp_path):
    folder = _saved(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(folder, _G(2, 2), 0)
    assert "was written by a 1x1 grid" in str(e.value)
    assert "this run is 2x2" in str(e.value) and "same --stages/--replicas" in str(e.value)
    with pytest.raises(CheckpointError, match="was saved with model='mlp', this run has "
                                              "model='resnet20'"):
        load_checkpoint(folder, _G(1, 1), 0, {"model": "resnet20"})


def test_unknown_config_key():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys: \['stagez'\]"):
        TrainConfig.from_dict({"stagez": 2})


def test_two_ranks_on_one_gpu():
    from dpsgs.comm.device import GpuSlot, SharedGPUError, check_unique_gpus

    slots = [GpuSlot(0, "node1", 0, "GPU-aaa"), GpuSlot(1, "node1", 1, "GPU-bbb"),
             GpuSlot(2, "node1", 0, "GPU-aaa")]
    with pytest.raises(SharedGPUError) as e:
        check_unique_gpus(slots, visible={"node1": 2})
    msg = str(e.value)
    assert "rank 2 and rank 0 both map to GPU GPU-aaa (cuda:0) on host node1" in msg
    assert "host node1: 3 ranks, 2 visible GPU(s)" in msg
    assert "launch at most one rank per GPU on each host" in msg
    check_unique_gpus(slots[:2])      # one rank per GPU: fine


def test_mpi_library_mismatch_message():
    from dpsgs.comm.mpi import MPILibraryMismatch, check_mpi_match

    with pytest.raises(MPILibraryMismatch) as e:
        check_mpi_match("MPICH Version: 4.2.0", "Open MPI v5.0.3")
    msg = str(e.value)
    assert "dpsgs._C and mpi4py use different MPI libraries; rebuild dpsgs" in msg
    assert "--- dpsgs._C links:\nMPICH Version: 4.2.0" in msg
    assert "--- mpi4py uses:\nOpen MPI v5.0.3" in msg
    check_mpi_match("MPICH Version: 5.0.2\n", "MPICH Version: 5.0.2")   # same library
