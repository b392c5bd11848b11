"""After scripts/setup.sh, `import dpsgs` works from any folder of its venv (an editable
install), and finds the dpsgs._C that `setup.py build_ext --inplace` keeps up to date."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

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
