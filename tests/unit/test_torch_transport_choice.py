"""--transport torch and --torch-backend: which backend a device gets, and one-line refusals."""

from __future__ import annotations

import pytest

from dpsgs.config import TrainConfig
from dpsgs.job.rank_context import torch_backend_for


def _cfg(backend: str, transport: str = "torch") -> TrainConfig:
    return TrainConfig(transport=transport, torch_backend=backend)


def test_auto_is_gloo_on_cpu_and_nccl_on_cuda() -> None:
    assert torch_backend_for(_cfg("auto"), "cpu") == "gloo"
    assert torch_backend_for(_cfg("auto"), "cuda") == "nccl"
    assert torch_backend_for(_cfg("dpsgs"), "cpu") == "dpsgs"
    assert torch_backend_for(_cfg("dpsgs"), "cuda") == "dpsgs"     # its CUDA tensors go to NCCL


def test_a_backend_that_cannot_move_the_device_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^--torch-backend gloo moves host memory: use --device "
                                         r"cpu, or --torch-backend nccl for cuda$"):
        torch_backend_for(_cfg("gloo"), "cuda")
    with pytest.raises(ValueError, match=r"^--torch-backend nccl moves GPU memory but the job runs "
                                         r"on cpu: use --device cuda, or --torch-backend gloo or dpsgs$"):
        torch_backend_for(_cfg("nccl"), "cpu")


def test_torch_backend_without_the_torch_transport_is_refused() -> None:
    _cfg("gloo").validate()
    with pytest.raises(ValueError, match=r"^--torch-backend gloo chooses the backend of --transport "
                                         r"torch; the transport is core$"):
        _cfg("gloo", "core").validate()
    with pytest.raises(ValueError, match=r"--transport must be one of core, mpi4py, torch, got 'tcp'"):
        _cfg("auto", "tcp").validate()


def test_the_simulated_device_is_refused_over_torch_in_one_line():
    # --device sim simulates dpsgs's own NCCL backend: torch.distributed would quietly run on the CPU
    with pytest.raises(ValueError, match="--transport torch runs on cpu or cuda: --device sim"):
        torch_backend_for(_cfg("auto"), "sim")
