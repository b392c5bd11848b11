"""dpsgs._C exports only PyInit__C, whatever the toolchain (regression: on the GPU machine a
compiler that links libstdc++ statically made the module export its copy, and torch, imported
after it, died with `free(): invalid pointer` in std::locale::~locale).

One build with `-static-libstdc++` (reproduces that toolchain here), then: the dynamic symbol
table holds PyInit__C alone, and the module imports and works before and after torch.
Slow (a whole build of its own): CI checks the same on the wheel it builds anyway, which
.ci/install-check.sh links with -static-libstdc++.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

_LOAD = """
import importlib.util, sys
def load():
    spec = importlib.util.spec_from_file_location("dpsgs._C", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_info()["mpi_library"], mod.build_info()
    return mod
def use_torch():
    import torch
    x = torch.arange(1000, dtype=torch.float64).reshape(10, 100)
    assert float((x @ x.T).trace()) > 0
    print(torch.__version__, file=sys.stderr)
"""


@pytest.fixture(scope="module")
def static_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("static-libstdcxx")
    env = dict(os.environ, LDFLAGS="-static-libstdc++", DPSGS_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out / "lib"),
                           "--build-temp", str(out / "tmp")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (so,) = (out / "lib" / "dpsgs").glob("_C*.so")
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
    assert "libstdc++" not in ldd, f"the build did not link libstdc++ statically:\n{ldd}"
    return so


def test_only_pyinit_is_exported(static_build):
    out = subprocess.run(["nm", "-D", "--defined-only", str(static_build)], capture_output=True,
                         text=True, check=True).stdout
    names = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
    assert names == ["PyInit__C"], f"{len(names)} exported symbols, first: {names[:10]}"


@pytest.mark.parametrize("order", ["C-then-torch", "torch-then-C"])
def test_imports_with_torch_in_either_order(static_build, order):
    body = "load(); use_torch()" if order == "C-then-torch" else "use_torch(); load()"
    proc = subprocess.run([sys.executable, "-c", _LOAD + body, str(static_build)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "invalid pointer" not in proc.stderr
