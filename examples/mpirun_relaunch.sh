#!/bin/bash
# Relaunch a dpsgs run until it finishes, on however many ranks are there each time (plain
# mpirun, no batch system). A job that loses a rank ends within --timeout (the others name
# it); the next attempt resumes from the last good checkpoint with --elastic: K is kept and
# N = ranks / K, the checkpoint resharded (recorded in RUN_DIR/run.json).
#
#   examples/mpirun_relaunch.sh RUN_DIR K [train options ...]
#   RANKS_CMD='wc -l < hosts.txt' examples/mpirun_relaunch.sh runs/r56 2 --model resnet56 ...
#
# Ranks per attempt: the output of $RANKS_CMD when set (e.g. a count of the healthy hosts),
# else the next number of $RANKS ("4 2": 4, then 2 from then on), else `nproc`. Pass your
# own mpirun options in $MPIRUN (e.g. MPIRUN="mpirun --hostfile hosts.txt").
set -uo pipefail
RUN_DIR=$1; K=$2; shift 2
MPIRUN=${MPIRUN:-mpirun}
MAX_ATTEMPTS=${MAX_ATTEMPTS:-5}
read -r -a SCHEDULE <<< "${RANKS:-}"

finished() {
    python - "$RUN_DIR" <<'PY'
import json, sys
from pathlib import Path
f = Path(sys.argv[1]) / "run.json"
sys.exit(0 if f.is_file() and json.loads(f.read_text()).get("finished") else 1)
PY
}

for (( attempt = 0; attempt < MAX_ATTEMPTS; attempt++ )); do
    if [[ -n "${RANKS_CMD:-}" ]]; then
        np=$(eval "$RANKS_CMD")
    elif (( ${#SCHEDULE[@]} )); then
        np=${SCHEDULE[$(( attempt < ${#SCHEDULE[@]} ? attempt : ${#SCHEDULE[@]} - 1 ))]}
    else
        np=$(nproc)
    fi
    echo "relaunch: attempt $(( attempt + 1 )) on $np ranks (K=$K)" >&2
    $MPIRUN -n "$np" python -m dpsgs train -K "$K" --elastic --resume auto --run-dir "$RUN_DIR" "$@"
    rc=$?
    if finished; then
        echo "relaunch: run $RUN_DIR finished" >&2
        exit 0
    fi
    echo "relaunch: the job ended with exit $rc before the run finished" >&2
    sleep "${RELAUNCH_DELAY:-2}"
done
echo "relaunch: gave up after $MAX_ATTEMPTS attempts" >&2
exit 1
