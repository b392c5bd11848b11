"""After scripts/setup.sh, `import dpsgs` works from any folder of its venv (an editable
install), and finds the dpsgs._C that `setup.py build_ext --inplace` keeps up to date."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_dpsgs_imports_from_outside_the_checkout(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", "import dpsgs, dpsgs._C; print(dpsgs.__file__); "
                        "print(dpsgs._C.__file__)"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0, f"run `bash scripts/setup.sh` (it installs dpsgs editable): {p.stderr}"
    package, extension = p.stdout.split()
    assert Path(package) == REPO / "dpsgs" / "__init__.py"
    # the very file the in-place build writes, not a copy made by the install
    assert Path(extension) == REPO / "dpsgs" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"


@pytest.mark.parametrize("build_ext,extensions", [("0", []), ("1", ["dpsgs._C"])])
def test_the_editable_install_leaves_the_extension_to_the_in_place_build(build_ext: str,
                                                                          extensions: list[str]) -> None:
    # scripts/setup.sh installs with DPSGS_BUILD_EXT=0: pip compiled dpsgs._C in a temporary
    # folder, then the in-place build, finding no build of its own, compiled it again
    assert "DPSGS_BUILD_EXT=0 pip install" in (REPO / "scripts" / "setup.sh").read_text()
    code = ("import setuptools, sys; from distutils.core import run_setup; "
            "d = run_setup('setup.py', ['--name'], stop_after='init'); "
            "print(*[e.name for e in d.ext_modules or []], file=sys.stderr, sep='\\n')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "DPSGS_BUILD_EXT": build_ext})
    assert p.returncode == 0, p.stderr
    named = [line for line in p.stderr.splitlines() if line.startswith("dpsgs.")]
    assert named == extensions
