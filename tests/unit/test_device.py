"""Pure tests of GPU selection: local rank, device mapping, shared-GPU detection (no GPU, no MPI)."""

from __future__ import annotations

import pytest

from dpsgs.comm.device import (GpuSlot, SharedGPUError, check_unique_gpus, device_for, find_shared_gpus,
                          host_identity, local_rank_from_env, local_rank_from_hosts, physical_gpu_id,
                          select_device)


@pytest.mark.parametrize("env, expect", [
    ({"MPI_LOCALRANKID": "3"}, (3, "MPI_LOCALRANKID")),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (1, "OMPI_COMM_WORLD_LOCAL_RANK")),
    ({"SLURM_LOCALID": "0"}, (0, "SLURM_LOCALID")),
    ({"MPI_LOCALRANKID": "2", "SLURM_LOCALID": "5"}, (2, "MPI_LOCALRANKID")),  # launcher first
    ({"MPI_LOCALRANKID": " ", "SLURM_LOCALID": "5"}, (5, "SLURM_LOCALID")),   # blank = unset
    ({}, None),
])
def test_local_rank_from_env(env, expect):
    assert local_rank_from_env(env) == expect


@pytest.mark.parametrize("value", ["x", "-1", "1.5"])
def test_local_rank_from_env_rejects_garbage(value):
    with pytest.raises(ValueError, match="MPI_LOCALRANKID"):
        local_rank_from_env({"MPI_LOCALRANKID": value})


def test_local_rank_from_hosts():
    hosts = ["a", "b", "a", "a", "b"]
    assert [local_rank_from_hosts(hosts, r) for r in range(5)] == [0, 0, 1, 2, 1]
    assert local_rank_from_hosts(["solo"], 0) == 0
    with pytest.raises(ValueError):
        local_rank_from_hosts(hosts, 5)


@pytest.mark.parametrize("local, visible, device", [(0, 1, 0), (3, 4, 3), (5, 4, 1), (7, 8, 7), (2, 2, 0)])
def test_device_for(local, visible, device):
    assert device_for(local, visible) == device


def test_device_for_without_gpu():
    with pytest.raises(ValueError, match="no CUDA device"):
        device_for(0, 0)


def test_physical_gpu_id():
    assert physical_gpu_id(1, None) == "1"
    assert physical_gpu_id(1, "") == "1"
    assert physical_gpu_id(0, "3,2") == "3"
    assert physical_gpu_id(1, "GPU-aa, GPU-bb") == "GPU-bb"
    assert physical_gpu_id(5, "3,2") == "5"   # out of range: the ordinal, never a crash


def _slots(layout):
    return [GpuSlot(r, h, d, g) for r, (h, d, g) in enumerate(layout)]


def test_unique_gpus_pass():
    # 2 hosts x 2 GPUs, one rank each; the same ordinal on different hosts is fine.
    check_unique_gpus(_slots([("a", 0, "U0"), ("a", 1, "U1"), ("b", 0, "U0"), ("b", 1, "U1")]))
    check_unique_gpus(_slots([]))


def test_find_shared_gpus_pairs():
    slots = _slots([("a", 0, "U0"), ("a", 1, "U1"), ("a", 0, "U0"), ("a", 0, "U0")])
    pairs = find_shared_gpus(slots)
    assert [(x.rank, y.rank) for x, y in pairs] == [(0, 2), (0, 3)]


def test_shared_gpu_error_names_both_ranks_and_gpu():
    # 3 ranks on a 2-GPU host: local ranks 0,1,2 -> devices 0,1,0.
    layout = [("node7", device_for(lr, 2), f"GPU-{device_for(lr, 2)}") for lr in range(3)]
    with pytest.raises(SharedGPUError) as err:
        check_unique_gpus(_slots(layout), visible={"node7": 2})
    text = str(err.value)
    assert "rank 2 and rank 0" in text and "GPU-0" in text and "node7" in text
    assert "3 ranks, 2 visible GPU(s)" in text
    assert isinstance(err.value, ValueError)


def test_same_physical_gpu_under_different_ordinals():
    # CUDA_VISIBLE_DEVICES=1 for rank 0 and =0,1 for rank 1: ordinals differ, the GPU does not.
    slots = [GpuSlot(0, "h", 0, physical_gpu_id(0, "1")), GpuSlot(1, "h", 1, physical_gpu_id(1, "0,1"))]
    with pytest.raises(SharedGPUError, match="rank 1 and rank 0"):
        check_unique_gpus(slots)


class _FakeComm:
    """Stands in for an mpi4py communicator of `size` ranks whose allgathers are scripted."""

    def __init__(self, rank, per_rank):
        self.rank, self.per_rank, self.calls = rank, per_rank, 0

    def Get_rank(self):
        return self.rank

    def allgather(self, value):
        self.calls += 1
        if self.calls == 1:  # (host, launcher's local rank): a bare host name has local rank 0
            return [value if i == self.rank else (p[0] if isinstance(p[0], tuple) else (p[0], 0))
                    for i, p in enumerate(self.per_rank)]
        out = list(self.per_rank)
        out[self.rank] = value  # this rank's real answer
        return [o if i == self.rank else o[1] for i, o in enumerate(out)]


def test_select_device_single_rank_uses_env(monkeypatch):
    import socket

    host = socket.gethostname()
    comm = _FakeComm(0, [(host, None)])
    choice = select_device(comm, visible=4, env={"MPI_LOCALRANKID": "6", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert (choice.device, choice.local_rank, choice.source) == (2, 6, "MPI_LOCALRANKID")


def test_select_device_raises_on_every_rank_when_one_has_no_gpu():
    import socket

    host = socket.gethostname()
    other = ("other", -1, "", 0, "no CUDA device is visible to this process")
    comm = _FakeComm(0, [(host, None), ("other", other)])
    with pytest.raises(ValueError, match="rank 1 on other: no CUDA device"):
        select_device(comm, visible=1, env={})


def test_host_identity_follows_nccl_hostid():
    import socket

    assert host_identity({}) == socket.gethostname()
    assert host_identity({"NCCL_HOSTID": " host-3 "}) == "host-3"
    assert host_identity({"NCCL_HOSTID": ""}) == socket.gethostname()


def test_select_device_accepts_one_gpu_shared_by_distinct_nccl_hostids():
    # NCCL treats ranks with different NCCL_HOSTIDs as different hosts (GPU.md's recipe for
    # several ranks on one GPU); the guard must agree with NCCL rather than refuse.
    peer = ("host-1", 0, "0", 1, None)
    comm = _FakeComm(0, [("host-0", None), ("host-1", peer)])
    choice = select_device(comm, visible=1, env={"NCCL_HOSTID": "host-0", "MPI_LOCALRANKID": "0"})
    assert (choice.device, choice.host) == (0, "host-0")


def test_select_device_refuses_one_gpu_under_one_nccl_hostid():
    peer = ("host-x", 0, "0", 1, None)
    comm = _FakeComm(0, [("host-x", None), ("host-x", peer)])
    with pytest.raises(SharedGPUError, match="rank 1 and rank 0 both map to GPU 0 .* on host host-x"):
        select_device(comm, visible=1, env={"NCCL_HOSTID": "host-x", "MPI_LOCALRANKID": "0"})


def test_an_inherited_local_rank_falls_back_to_host_names():
    # regression: a batch step's SLURM_LOCALID=0, inherited by every rank of another launcher,
    # mapped every rank of a node to GPU 0; a value that repeats on a host is not a local rank
    peer = ("node-a", 0, "0", 2, None)     # rank 0's answer: GPU 0
    comm = _FakeComm(1, [(("node-a", 0), peer), (("node-a", 0), None)])
    choice = select_device(comm, visible=2, env={"NCCL_HOSTID": "node-a", "SLURM_LOCALID": "0"})
    assert (choice.local_rank, choice.device) == (1, 1)
    assert choice.source == "hostnames (SLURM_LOCALID is unset on some rank or repeats on a host)"
    distinct = _FakeComm(1, [(("node-a", 0), peer), (("node-a", 1), None)])
    choice = select_device(distinct, visible=2, env={"NCCL_HOSTID": "node-a", "SLURM_LOCALID": "1"})
    assert (choice.local_rank, choice.source) == (1, "SLURM_LOCALID")


@pytest.mark.parametrize("var", ["PALS_LOCAL_RANKID", "MV2_COMM_WORLD_LOCAL_RANK"])
def test_local_rank_of_cray_and_mvapich_launchers(var):
    assert local_rank_from_env({var: "3"}) == (3, var)


# -- --device auto|cuda: the job-wide decision from every rank's CudaView ------------------
from dpsgs.comm.device import CudaView, DeviceDecision, cuda_missing, driver_gpu_count, resolve_device  # noqa: E402
from dpsgs.comm.grid import Grid  # noqa: E402

_LABELS = [Grid(2, 2).label(r) for r in range(4)]


def _view(host="h", local=None, gpus=("GPU-0",), torch_cuda=True, nccl=True):
    return CudaView(host, local, tuple(gpus), torch_cuda, "2.13.0+cu130" if torch_cuda else "2.13.0+cpu", nccl)


@pytest.mark.parametrize("view, why", [
    # the first thing missing, in the order GPU, CUDA build of torch, NCCL build of dpsgs
    (_view(gpus=(), torch_cuda=False, nccl=False), "no GPU is visible"),
    (_view(gpus=(), torch_cuda=True, nccl=True), "no GPU is visible"),
    (_view(torch_cuda=False, nccl=False), "this torch (2.13.0+cpu) is a CPU build, not a CUDA one"),
    (_view(nccl=False), "dpsgs._C was built without the NCCL backend (rebuild: DPSGS_CUDA=1 bash "
                        "scripts/setup.sh)"),
])
def test_cuda_names_the_first_thing_missing_in_order(view, why):
    with pytest.raises(ValueError) as e:
        resolve_device("cuda", [view])
    assert str(e.value) == f"--device cuda: {why}"
    assert resolve_device("auto", [view]) == DeviceDecision("cpu", why)
    assert resolve_device("cpu", [view]) == DeviceDecision("cpu", "")


def test_one_process_needs_no_nccl_build():
    # --simulate: every virtual rank on the one GPU; a GPU and a CUDA torch are enough
    assert resolve_device("auto", [_view(nccl=False)], nccl=False) == DeviceDecision("cuda", "a GPU is visible")
    assert resolve_device("cuda", [_view(nccl=False)], nccl=False) == DeviceDecision("cuda", "")


def test_auto_on_one_gpu_with_several_ranks_runs_on_cpu_and_says_why():
    # issue 17: one GPU, 4 ranks on one host; auto took cuda and every rank died in SharedGPUError
    views = [_view(local=r) for r in range(4)]
    d = resolve_device("auto", views, labels=_LABELS)
    assert d == DeviceDecision("cpu", "4 ranks on host h share 1 GPU(s): rank 1 (replica 0, stage 1) "
                                      "would use rank 0 (replica 0, stage 0)'s GPU GPU-0 (NCCL needs "
                                      "one GPU per rank)")
    with pytest.raises(ValueError, match=r"^--device cuda: 4 ranks on host h share 1 GPU\(s\)"):
        resolve_device("cuda", views, labels=_LABELS)
    # without launcher variables the ranks are counted by host name, as select_device does
    assert resolve_device("auto", [_view() for _ in range(2)]).device == "cpu"


def test_auto_takes_cuda_where_every_rank_has_its_own_gpu():
    gpus = ("GPU-a", "GPU-b")
    # 2 hosts x 2 GPUs, local ranks 0, 1 on each
    views = [_view(host=h, local=r, gpus=gpus) for h in ("n0", "n1") for r in range(2)]
    assert resolve_device("auto", views) == DeviceDecision("cuda", "every rank has a GPU of its own")
    assert resolve_device("cuda", views) == DeviceDecision("cuda", "")
    # one GPU each through CUDA_VISIBLE_DEVICES: ordinal 0 everywhere, four different GPUs
    views = [_view(local=r, gpus=(f"GPU-{r}",)) for r in range(4)]
    assert resolve_device("auto", views).device == "cuda"
    # several ranks on one GPU, each with its own NCCL_HOSTID (docs/gpu.md), as NCCL allows
    views = [_view(host=f"host-{r}", local=0) for r in range(2)]
    assert resolve_device("auto", views).device == "cuda"
    # 3 ranks on a 2-GPU host: two would share
    views = [_view(local=r, gpus=gpus) for r in range(3)]
    assert resolve_device("auto", views).why.startswith("3 ranks on host h share 2 GPU(s): rank 2 would use rank 0's GPU GPU-a")


def test_a_rank_that_lacks_something_is_named():
    views = [_view(host="a"), _view(host="b", gpus=()), _view(host="c", gpus=())]
    assert cuda_missing(views, labels=_LABELS[:3]) == ("rank 1 (replica 0, stage 1) on host b, rank 2 "
                                                      "(replica 1, stage 0) on host c: no GPU is visible")
    views = [_view(host=str(r), local=0, torch_cuda=r == 0) for r in range(5)]
    assert cuda_missing(views) == ("rank 1 on host 1, rank 2 on host 2, rank 3 on host 3 and 1 more: "
                                   "this torch (2.13.0+cpu) is a CPU build, not a CUDA one")


def test_driver_gpu_count(tmp_path):
    assert driver_gpu_count({}, tmp_path / "absent") == 0
    for bus in ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0"):
        (tmp_path / bus).mkdir()
    assert driver_gpu_count({}, tmp_path) == 3
    assert driver_gpu_count({"CUDA_VISIBLE_DEVICES": "2,0"}, tmp_path) == 2
    assert driver_gpu_count({"CUDA_VISIBLE_DEVICES": "0,7,1"}, tmp_path) == 1   # CUDA stops at 7
    assert driver_gpu_count({"CUDA_VISIBLE_DEVICES": "-1"}, tmp_path) == 0
    assert driver_gpu_count({"CUDA_VISIBLE_DEVICES": ""}, tmp_path) == 0
    assert driver_gpu_count({"CUDA_VISIBLE_DEVICES": "GPU-8c1f,GPU-99"}, tmp_path) == 2
