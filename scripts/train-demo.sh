#!/usr/bin/env bash
# README command 1: set up, then train the default job: an MLP on scikit-learn's handwritten
# digits, K=2 pipeline stages x N=2 replicas = 4 MPI ranks, fully decoupled (fdg) schedule.
# Extra arguments go to `dpsgs train`. Run again, it reports the finished run (--resume auto:
# the run folder belongs to this run; a stopped run continues from its last checkpoint).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup.sh
. "$repo/scripts/setup.sh"
cd "$repo"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mpirun -n 4 python -m mpi4py -m dpsgs train --stages 2 --replicas 2 --model mlp \
  --dataset digits --epochs 20 --run-dir runs/digits-fdg-2x2 --resume auto "$@"
