"""The GPU suite's markers: `-m gpu` (scripts/gpu-check.sh on a GPU machine) selects every
test's cuda variant, test_descriptors.py's included (regression: that file had no gpu test,
so the GPU run never ran it), and CI's `-m "not slow and not gpu"` selects the sim variants."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _collect(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_gpu_marker_selects_the_cuda_variants_of_every_gpu_test_file():
    ids = _collect("-m", "gpu", "tests/gpu/test_nccl.py", "tests/gpu/test_descriptors.py",
                   "tests/gpu/test_accelerator.py")
    assert ids and not [i for i in ids if "[sim" in i or "-sim" in i]
    for name in ("test_nccl.py", "test_descriptors.py", "test_accelerator.py"):
        assert [i for i in ids if name in i and "cuda" in i], f"-m gpu runs nothing of {name}"


def test_ci_selection_runs_the_sim_variants_and_no_cuda_one():
    ids = _collect("-m", "not slow and not gpu", "tests/gpu")
    assert not [i for i in ids if "[cuda" in i or "-cuda" in i]
    assert [i for i in ids if "test_nccl.py" in i and "sim" in i]
    assert [i for i in ids if "test_sim_hooks.py" in i]
