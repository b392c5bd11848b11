#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite (real MPI ranks under mpirun).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `-k channel`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup.sh
. "$repo/scripts/setup.sh"
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# --durations: the slowest tests, listed at the end, so CI time can be watched and trimmed
if [ $# -eq 0 ]; then set -- -m "not slow and not gpu" --durations=25; fi
python -m pytest tests "$@"
