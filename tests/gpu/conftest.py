"""The device axis of the GPU suite: every test taking `device` runs on "cuda" (real GPUs,
marked `gpu`, skipped where none is visible) and on "sim" (the CPU simulator of a
DPSGS_CUDA=sim build, unmarked, so it runs in CI; skipped on other builds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_launch import need_device  # noqa: E402

DEVICE_PARAMS = [pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("sim")]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> str:
    need_device(request.param)
    return request.param


@pytest.fixture
def sim() -> str:
    """For tests of the simulator's own hooks (faults, call counts): "sim" or a skip."""
    need_device("sim")
    return "sim"
