#!/usr/bin/env bash
# Idempotent set-up: .venv with pinned MPI/PyTorch/pybind11 from PyPI, dpsgs installed editable
# (importable from any folder of the venv), dpsgs._C built in place.
# Sourced by the other scripts; safe to run on its own: `bash scripts/setup.sh`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.requirements.sha
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing requirements (mpich, mpi4py, torch==2.13.0 CPU, pybind11, ...)"
  pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi
# `import dpsgs` from any folder of this venv: an editable install of this checkout (once; again
# if the checkout moved). Its import hook maps `dpsgs` to ./dpsgs, where the in-place build
# below puts dpsgs._C.
if ! (cd / && python -c "import importlib.util as u, os, sys; s = u.find_spec('dpsgs'); \
sys.exit(not s or os.path.realpath(s.origin) != os.path.realpath(sys.argv[1]))" "$repo/dpsgs/__init__.py"); then
  # The package alone: pip would compile the extension in a temporary folder, which leaves
  # the in-place build below nothing that says it is up to date (one compile, not two).
  echo "== pip install -e . (dpsgs importable from any folder of .venv)"
  DPSGS_BUILD_EXT=0 pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
fi
# Byte-compile the package and the tests once. Where PYTHONDONTWRITEBYTECODE is set (common in
# containers, and on CI's machines) no rank would write it, so every rank would compile dpsgs
# from source again: 0.7 of the ~4.7 CPU-s a 1-rank training run takes here (4.7 -> 4.0).
# A stale .pyc is never used: Python checks it against the source's mtime.
python -m compileall -q dpsgs tests examples > /dev/null
echo "== building dpsgs._C (DPSGS_CUDA=${DPSGS_CUDA:-auto})"
python setup.py -q build_ext --inplace 2>&1 | grep -vE "^(running|copying|creating)" || true
python -c "import dpsgs; print('dpsgs', dpsgs.build_info())"
