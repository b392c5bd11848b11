#!/usr/bin/env bash
# One call on a GPU machine: set up, build dpsgs._C with NCCL, then run the GPU checks in
# order of importance inside a time budget, with a summary line at the end.
#
#   bash scripts/gpu-check.sh                       # the default steps, in 540 s at most
#   bash scripts/gpu-check.sh trainer-tests nccl    # some steps (a second call)
#   bash scripts/gpu-check.sh all                   # every step, bench too
#   GPU_CHECK_SECONDS=1500 bash scripts/gpu-check.sh all   # a budget of your own
#   bash scripts/gpu-check.sh --fetch-wheels        # beforehand, on a machine with pip access
#
# Steps (the default is every one but bench, in this order):
#   nccl-tests     tests/gpu/test_nccl.py and test_descriptors.py: channels, all-reduce on
#                  world and split groups (2-8 ranks), header mismatch, dead peer, the
#                  shared-GPU guard, torch/CuPy descriptors
#   train          README command 1 on CUDA in float32 and bf16, and on the CPU
#   trainer-tests  tests/gpu/test_trainer_gpu.py: fdg == reference on CUDA, sync, kill, resume
#   nccl           the rank program's all-reduce check and `dpsgs bench nccl --check`, 2 ranks
#   bench          `dpsgs bench train --device cuda` (fdg, sync, DDP over NCCL)
# A test step with a skipped test fails (on a GPU machine a skip means it did not run).
# The two test steps run side by side (one GPU has room for both, and each test's ranks
# have communicators of their own). The build always runs first (a no-op when the tree is built already).
#
# Time: a lent machine allows 10 min a call and 15 min of device time a session, and is
# given back 30 s after a call, so every call starts bare. Each step is bounded by its own
# limit and by what is left of GPU_CHECK_SECONDS (default 540); a step that cannot start
# in time is reported "not run (out of time)" and the summary says INCOMPLETE, not PASS.
#
# Results: each step's files are packed into one archive per step as soon as the step ends
# (so a call cut short keeps what finished): $OUT/<step>.tgz, with the log $OUT/gpu-check.log,
# at most 7 files (the device tool returns 8). Without $OUT they go to build/gpu-check/.
#
# Set-up: where a folder .whl/ holds MPI wheels (a GPU image with torch/CuPy/NCCL but no MPI
# library, as the lent H200 has: docs/gpu.md; carry ".whl" in the device call), a venv is made
# over the image's packages and the wheels are installed into it; else the current
# environment is used as is (a cluster node with its own MPI and torch). Several ranks on
# one GPU: the launchers give each rank its own NCCL_HOSTID (NCCL then treats them as
# separate hosts, connected by sockets over lo); dpsgs itself never sets it.
set -u
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc obeys OMP_NUM_THREADS
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "${1:-}" = "--fetch-wheels" ]; then
  py=${GPU_PYTHON_VERSION:-3.12}
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl mpich==5.0.2 mpi4py==4.1.2
fi

all_steps=(nccl-tests train trainer-tests nccl bench)
default_steps=(nccl-tests train trainer-tests nccl)
steps=()
for s in "$@"; do
  case "$s" in
    all) steps+=("${all_steps[@]}") ;;
    tests) steps+=(nccl-tests trainer-tests) ;;
    build) ;;   # always runs
    *) [[ " ${all_steps[*]} " == *" $s "* ]] \
         || { echo "gpu-check: unknown step '$s' (steps: ${all_steps[*]}, tests, all)" >&2; exit 2; }
       steps+=("$s") ;;
  esac
done
[ $# -gt 0 ] || steps=("${default_steps[@]}")
want() { [[ " ${steps[*]} " == *" $1 "* ]]; }

work=$repo/build/gpu-check        # every step's files, packed into $results as it ends
results=${OUT:-$work}
rm -rf "$work" && mkdir -p "$work" "$results"
exec > >(tee -a "$results/gpu-check.log") 2>&1
tee_pid=$!
T0=$(date +%s)
budget=${GPU_CHECK_SECONDS:-540}
failures=() skipped=()
now() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( budget - $(now) )); }
step() { echo; echo "=== [$(now) s] $*"; }
run() {  # [what=LABEL] run SECONDS CMD...: bounded by SECONDS and the budget, echoed, failure recorded
  local t=$1; shift
  local l; l=$(left)
  [ "$l" -lt "$t" ] && t=$(( l > 1 ? l : 1 ))
  echo "+ (<= ${t} s) $*"
  timeout -k 10 "$t" "$@"
  local rc=$?
  [ $rc -eq 0 ] || failures+=("${what:-$*} (rc $rc$([ $rc -eq 124 ] && echo ', timed out'))")
  return $rc
}
begin() {  # begin STEP MIN_SECONDS: false (and noted) when STEP is not wanted or cannot fit
  want "$1" || return 1
  if [ "$(left)" -lt "$2" ]; then skipped+=("$1"); echo "=== $1: not run (out of time: $(left) s left)"; return 1; fi
  step "$1"; mkdir -p "$work/$1"
}
pack() {  # pack STEP: the step's files into one archive beside the log
  tar czf "$results/$1.tgz" --exclude=checkpoints -C "$work" "$1" 2>/dev/null || true
}
finish() {
  step "summary"
  local what="${steps[*]}"
  if [ ${#failures[@]} -gt 0 ]; then
    echo "gpu-check: FAIL ($what) in $(now) s:"; printf '  - %s\n' "${failures[@]}"
  elif [ ${#skipped[@]} -gt 0 ]; then
    echo "gpu-check: INCOMPLETE ($what) in $(now) s: passed what ran; not run (out of time): ${skipped[*]}"
  else
    echo "gpu-check: PASS ($what) in $(now) s"
  fi
  for s in "${steps[@]}"; do
    [ -f "$work/$s/summary.txt" ] && sed "s/^/  $s: /" "$work/$s/summary.txt"
  done
  exec >&- 2>&-
  wait "$tee_pid" 2>/dev/null   # let tee write the last lines before the call ends
  [ ${#failures[@]} -eq 0 ] && [ ${#skipped[@]} -eq 0 ]
}

step "machine"
nvidia-smi -L 2>&1 | head -8
echo "cores: $cores | budget: ${budget} s | steps: ${steps[*]}"

if compgen -G ".whl/*.whl" > /dev/null; then
  step "venv over the image's packages + carried wheels ($(ls .whl | tr '\n' ' '))"
  image_site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  venv=/tmp/dpsgs-gpu-venv
  if [ ! -x "$venv/bin/mpirun" ]; then    # once per machine: a call on a warm one reuses it
    python3 -m venv "$venv" && . "$venv/bin/activate"
    run 300 pip install -q --no-index --no-deps --ignore-installed .whl/*.whl || { finish; exit 1; }
    # the venv does not see the image's packages (torch, CuPy, NCCL, pybind11): point it there
    echo "$image_site" > "$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/image-packages.pth"
  fi
  . "$venv/bin/activate"
fi
python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())" || true
command -v mpirun > /dev/null || { echo "gpu-check: no mpirun here: carry MPI wheels in .whl/ (--fetch-wheels)"; failures+=("no MPI"); finish; exit 1; }
echo "mpirun: $(command -v mpirun)"

step "build dpsgs._C with DPSGS_CUDA=1"
mkdir -p "$work/build"
what=build run 300 env DPSGS_CUDA=1 python setup.py build_ext --inplace -j "$cores" > "$work/build/build.txt" 2>&1 \
  || { tail -40 "$work/build/build.txt"; pack build; finish; exit 1; }
python -c "import dpsgs; print(dpsgs.build_info())" || { finish; exit 1; }
python -c "import dpsgs, sys; sys.exit(0 if dpsgs.build_info()['nccl'] else 1)" \
  || { echo "dpsgs._C was built without its NCCL backend (build.txt says why)"; failures+=("no NCCL backend"); pack build; finish; exit 1; }
exported=$(nm -D --defined-only dpsgs/_C*.so | awk '{print $NF}')
echo "exported dynamic symbols: $exported"
[ "$exported" = "PyInit__C" ] || failures+=("dpsgs._C exports more than PyInit__C")
pack build
gpus=$(python -c "from dpsgs import _C; print(_C.cuda_device_count())")
share=()     # prefix for mpirun's program where ranks outnumber GPUs
share_for() {  # share_for NRANKS
  share=()
  if [ "$gpus" -lt "$1" ]; then
    share=(bash -c 'export NCCL_HOSTID="dpsgs-check-${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}"; exec "$@"' share-gpu)
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
    echo "($1 ranks on $gpus GPU(s): they share over NCCL's socket transport; bandwidths are socket figures)"
  fi
}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# the two test steps side by side: each a pytest of one file, per-test durations listed
pytest_step() {  # pytest_step STEP SECONDS FILE...: a skipped test fails the step (nothing ran)
  local s=$1 t=$2 d=$work/$1; shift 2
  what="pytest $s" run "$t" python -m pytest -m gpu -rsP -q --durations=0 "$@" --junitxml="$d/junit.xml" > "$d/pytest.txt" 2>&1
  local rc=$?
  tail -1 "$d/pytest.txt" > "$d/summary.txt"
  grep -q skipped "$d/summary.txt" && rc=1
  return $rc
}
tests_started=()
nccl_files=(tests/gpu/test_nccl.py tests/gpu/test_descriptors.py)
trainer_files=(tests/gpu/test_trainer_gpu.py)
if begin nccl-tests 120; then
  pytest_step nccl-tests 480 "${nccl_files[@]}" &
  tests_started+=("nccl-tests:$!")
fi
# trainer-tests waits for train when both are wanted (train is short and shows the job first)
if ! want train && begin trainer-tests 120; then
  pytest_step trainer-tests 480 "${trainer_files[@]}" &
  tests_started+=("trainer-tests:$!")
fi

if begin train 60; then
  share_for 4
  job=(-K 2 -N 2 --model mlp --dataset digits --epochs 20 --no-progress)
  for form in "cuda none" "cuda bf16" "cpu none"; do
    set -- $form
    out=$work/train/digits-$1-$2
    what="train digits --device $1 --amp $2" run 240 mpirun -n 4 "${share[@]}" python -m mpi4py -m dpsgs train "${job[@]}" --device "$1" --amp "$2" \
      --run-dir "$out" > "$out.txt" 2>&1 || { tail -5 "$out.txt"; continue; }
    python - "$out/summary.json" "$1 $2" <<'PY' | tee -a "$work/train/summary.txt" || failures+=("digits $1 $2: no summary")
import json, sys
s = json.load(open(sys.argv[1]))
print(sys.argv[2], {k: s[k] for k in ("test_accuracy", "test_loss", "seconds", "samples_per_s") if k in s})
PY
  done
  pack train
fi
if want trainer-tests && want train && begin trainer-tests 120; then
  pytest_step trainer-tests 480 "${trainer_files[@]}" &
  tests_started+=("trainer-tests:$!")
fi
for entry in "${tests_started[@]}"; do
  s=${entry%%:*}
  wait "${entry##*:}" || failures+=("$s: $(cat "$work/$s/summary.txt")")
  step "$s: $(cat "$work/$s/summary.txt")"
  tail -40 "$work/$s/pytest.txt"
  pack "$s"
done

if begin nccl 90; then
  share_for 2
  PYTHONPATH="$PYTHONPATH:$repo/tests/gpu/ranks" what="nccl_bench_ranks.py --check" \
    run 150 mpirun -n 2 "${share[@]}" python -m mpi4py tests/gpu/ranks/nccl_bench_ranks.py --check -e 64M \
    > "$work/nccl/nccl-bench-ranks.txt" 2>&1
  cat "$work/nccl/nccl-bench-ranks.txt"
  what="dpsgs bench nccl --check" run 200 mpirun -n 2 "${share[@]}" python -m dpsgs bench nccl --check -e 64M --out "$work/nccl/bench-nccl-2ranks.json" \
    > "$work/nccl/bench-nccl-2ranks.txt" 2>&1
  cat "$work/nccl/bench-nccl-2ranks.txt"
  pack nccl
fi

if begin bench 120; then
  what="dpsgs bench train --device cuda" run 500 python -m dpsgs bench train --device cuda --workload cnn --steps 30 --warmup 5 \
    --out "$work/bench/bench-train-cuda" > "$work/bench/bench-train-cuda.txt" 2>&1
  cat "$work/bench/bench-train-cuda.txt"
  pack bench
fi

finish
