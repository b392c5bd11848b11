#!/usr/bin/env bash
# The full fault-injection matrix (issue 5): seeded random trials over topologies 2x1, 2x2,
# 3x1, every phase (warmup forward backward reduce flush eval save) and the kinds sigkill,
# exit, hang, exception. Each trial runs `mpirun ... python -m dpsgs train --timeout 4` with
# DPSGS_FAULT set and checks: no hang, non-zero exit within timeout + 10 s of the fault, and
# a message naming the dead rank or the operation. Prints the table, writes the JSON to a new
# file (never over another run's results).
#
#   bash scripts/fault-matrix.sh              # 24 trials, seed 1 (~6-10 min on 2 cores)
#   bash scripts/fault-matrix.sh 30 7         # 30 trials, seed 7
#   bash scripts/fault-matrix.sh 24 1 bench/results/fault-matrix-new.json   # to publish: a new name
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
trials=${1:-24}
seed=${2:-1}
out=${3:-runs/fault-matrix/fault-matrix-seed$seed-$(date +%Y%m%d-%H%M%S).json}
if [ -e "$out" ]; then
  echo "fault-matrix: $out already exists (another run's results); name another file" >&2
  exit 2
fi
python tests/mpi/fault_trial.py --trials "$trials" --seed "$seed" --json "$out"
echo "wrote $out"
