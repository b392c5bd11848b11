#!/usr/bin/env bash
# The GPU checks on a lent GPU machine, planned as TWO device calls that fit its limits (10
# min a call, 15 min of device time a session, start-up included: each call's budget is
# GPU_CHECK_SECONDS, 330 s by default, so start + call 1 + call 2 stay near 13 min):
#
#   bash scripts/gpu-check.sh                       # call 1: nccl-tests, train
#   bash scripts/gpu-check.sh trainer-tests nccl    # call 2 (the machine is warm for 30 s; else it rebuilds)
#   bash scripts/gpu-check.sh all                   # every step, bench too (GPU_CHECK_SECONDS=1500)
#   bash scripts/gpu-check.sh --fetch-wheels        # beforehand, on a machine with pip access
#   GPU_CHECK_DEVICE=sim bash scripts/gpu-check.sh  # rehearsal on CPUs: the simulator (DPSGS_CUDA=sim)
#
# Steps (in this order; each bounded by its own limit and by what is left of the budget):
#   nccl-tests     tests/gpu/test_nccl.py, test_descriptors.py, test_accelerator.py (-m gpu)
#   train          README command 1 on CUDA in float32 and bf16 (sim: float32), and on the CPU
#   trainer-tests  tests/gpu/test_trainer_gpu.py: fdg == reference on the device, sync, bf16, kill, resume
#   nccl           the rank program's all-reduce check and `dpsgs bench nccl --check`, 2 ranks
#   bench          `dpsgs bench train --device cuda` (fdg, sync, DDP over NCCL)
# Tests run verbose (each name is printed as it starts), split into shards that run side by
# side (GPU_CHECK_SHARDS, 3), every rank launch capped at GPU_CHECK_TEST_CAP s (150): a
# call cut short still says which tests passed, failed or were running. A skipped test
# fails its step (on a GPU machine a skip means it did not run).
#
# Results are written as they go, under $OUT (what the device call returns; without it,
# build/gpu-check/): gpu-check.log (everything), <step>.txt (a test step's pytest output,
# line by line), <step>.tgz (a step's files, packed when it ends): at most 8 files a call.
# The last line is `gpu-check: PASS|FAIL|INCOMPLETE`, naming what failed or did not run.
#
# Set-up: where .whl/ holds MPI wheels (a GPU image with torch/CuPy/NCCL but no MPI library,
# as the lent H100/H200 have: docs/gpu.md; carry ".whl" in the device call), a venv is made
# over the image's packages and the wheels are installed into it, once per machine; else
# the current environment is used. The build is skipped when dpsgs._C is already built.
set -u
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)   # nproc obeys OMP_NUM_THREADS
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# ranks start cold here (no fork server, tests/mpi/forkserver.py): the GPU run is the real
# thing, and 16 cores make torch's imports cheap
export DPSGS_TEST_FORKSERVER=${DPSGS_TEST_FORKSERVER:-0}
device=${GPU_CHECK_DEVICE:-cuda}

if [ "${1:-}" = "--fetch-wheels" ]; then
  py=${GPU_PYTHON_VERSION:-3.12}
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl mpich==5.0.2 mpi4py==4.1.2
fi

all_steps=(nccl-tests train trainer-tests nccl bench)
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
[ $# -gt 0 ] || steps=(nccl-tests train)
want() { [[ " ${steps[*]} " == *" $1 "* ]]; }

work=$repo/build/gpu-check        # every step's scratch files, packed into $results as it ends
results=${OUT:-$work/out}
rm -rf "$work" && mkdir -p "$work" "$results"
exec > >(tee -a "$results/gpu-check.log") 2>&1
tee_pid=$!
T0=$(date +%s)
budget=${GPU_CHECK_SECONDS:-330}
shards=${GPU_CHECK_SHARDS:-3}
export DPSGS_TEST_TIMEOUT_CAP=${GPU_CHECK_TEST_CAP:-150}
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
echo "cores: $cores | budget: ${budget} s | steps: ${steps[*]} | device: $device | shards: $shards"

if compgen -G ".whl/*.whl" > /dev/null; then
  step "venv over the image's packages + carried wheels ($(ls .whl | tr '\n' ' '))"
  image_site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  venv=/tmp/dpsgs-gpu-venv
  if [ ! -x "$venv/bin/mpirun" ]; then    # once per machine: a call on a warm one reuses it
    python3 -m venv "$venv" && . "$venv/bin/activate"
    run 120 pip install -q --no-index --no-deps --ignore-installed .whl/*.whl || { finish; exit 1; }
    # the venv does not see the image's packages (torch, CuPy, NCCL, pybind11): point it there
    echo "$image_site" > "$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/image-packages.pth"
  fi
  . "$venv/bin/activate"
fi
python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())" || true
command -v mpirun > /dev/null || { echo "gpu-check: no mpirun here: carry MPI wheels in .whl/ (--fetch-wheels)"; failures+=("no MPI"); finish; exit 1; }
echo "mpirun: $(command -v mpirun)"

build_mode=$([ "$device" = sim ] && echo sim || echo 1)
step "build dpsgs._C with DPSGS_CUDA=$build_mode"
mkdir -p "$work/build"
what=build run 240 env DPSGS_CUDA=$build_mode python setup.py build_ext --inplace -j "$cores" > "$work/build/build.txt" 2>&1 \
  || { tail -40 "$work/build/build.txt"; pack build; finish; exit 1; }
python -c "import dpsgs; print(dpsgs.build_info())" || { finish; exit 1; }
python -c "import dpsgs, sys; i = dpsgs.build_info(); sys.exit(0 if i['nccl'] and i['cuda_simulated'] == ('$device' == 'sim') else 1)" \
  || { echo "dpsgs._C was not built with the $device NCCL backend (build.txt says why)"; failures+=("no $device NCCL backend"); pack build; finish; exit 1; }
exported=$(nm -D --defined-only dpsgs/_C*.so | awk '{print $NF}')
echo "exported dynamic symbols: $exported"
[ "$exported" = "PyInit__C" ] || failures+=("dpsgs._C exports more than PyInit__C")
gpus=$(python -c "from dpsgs import _C; print(_C.cuda_device_count())")
share=()     # prefix for mpirun's program where ranks outnumber GPUs
share_for() {  # share_for NRANKS
  share=()
  if [ "$device" = cuda ] && [ "$gpus" -lt "$1" ]; then
    share=(bash -c 'export NCCL_HOSTID="dpsgs-check-${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}"; exec "$@"' share-gpu)
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
    echo "($1 ranks on $gpus GPU(s): they share over NCCL's socket transport; bandwidths are socket figures)"
  fi
}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# A test step: its tests (the device's variants) in $shards shards side by side, verbose, one
# line per test into $results/<step>.txt as it goes (each prefixed with its shard).
pytest_step() {  # pytest_step STEP SECONDS FILE...
  local s=$1 t=$2 d=$work/$1 sel; shift 2
  sel=$([ "$device" = sim ] && echo "not gpu and not slow" || echo gpu)
  python -m pytest --collect-only -q -m "$sel" "$@" 2>/dev/null | grep '::' \
    | { [ "$device" = sim ] && grep -v 'cuda' || cat; } > "$d/ids.txt"
  local n; n=$(wc -l < "$d/ids.txt")
  echo "$s: $n tests in $shards shards (each rank launch capped at ${DPSGS_TEST_TIMEOUT_CAP} s)"
  local pids=() i
  for (( i = 0; i < shards; i++ )); do
    awk -v k="$i" -v m="$shards" 'NR % m == k' "$d/ids.txt" > "$d/shard$i.txt"
    [ -s "$d/shard$i.txt" ] || continue
    local ids=()
    mapfile -t ids < "$d/shard$i.txt"     # test ids hold [brackets]: never let the shell glob them
    ( what="pytest $s shard $i" run "$t" python -m pytest -v -rs -p no:cacheprovider --durations=0 \
        -o faulthandler_timeout="$DPSGS_TEST_TIMEOUT_CAP" --junitxml="$d/junit$i.xml" "${ids[@]}" 2>&1 \
        | sed -u "s/^/[$i] /" >> "$results/$s.txt"
      exit "${PIPESTATUS[0]}" ) &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  grep -E '^\[[0-9]+\] =+ .*(passed|failed|skipped|error).* =+$' "$results/$s.txt" > "$d/summary.txt"
  grep -q -E 'skipped|error|failed' "$d/summary.txt" && rc=1
  [ -s "$d/summary.txt" ] || { echo "no pytest summary (cut short?)" > "$d/summary.txt"; rc=1; }
  return $rc
}
tests_started=()
nccl_files=(tests/gpu/test_nccl.py tests/gpu/test_descriptors.py tests/gpu/test_accelerator.py)
[ "$device" = sim ] && nccl_files+=(tests/gpu/test_sim_hooks.py)
trainer_files=(tests/gpu/test_trainer_gpu.py)
if begin nccl-tests 120; then
  pytest_step nccl-tests "$(left)" "${nccl_files[@]}" &
  tests_started+=("nccl-tests:$!")
fi

if begin train 60; then
  share_for 4
  job=(-K 2 -N 2 --model mlp --dataset digits --epochs 20 --no-progress)
  forms=("cuda none" "cuda bf16" "cpu none")
  [ "$device" = sim ] && forms=("sim none" "cpu none")
  for form in "${forms[@]}"; do
    set -- $form
    out=$work/train/digits-$1-$2
    what="train digits --device $1 --amp $2" run 120 mpirun -n 4 "${share[@]}" python -m mpi4py -m dpsgs train "${job[@]}" --device "$1" --amp "$2" \
      --run-dir "$out" > "$out.txt" 2>&1 || { tail -5 "$out.txt"; continue; }
    python - "$out/summary.json" "$1 $2" <<'PY' | tee -a "$work/train/summary.txt" || failures+=("digits $1 $2: no summary")
import json, sys
s = json.load(open(sys.argv[1]))
print(sys.argv[2], {k: s[k] for k in ("test_accuracy", "test_loss", "seconds", "samples_per_s") if k in s})
PY
  done
  pack train
fi
if begin trainer-tests 120; then
  pytest_step trainer-tests "$(left)" "${trainer_files[@]}" &
  tests_started+=("trainer-tests:$!")
fi
for entry in "${tests_started[@]}"; do
  s=${entry%%:*}
  wait "${entry##*:}" || failures+=("$s: $(tr '\n' ' ' < "$work/$s/summary.txt")")
  step "$s: $(tr '\n' ' ' < "$work/$s/summary.txt")"
  grep -E ' (FAILED|ERROR)|SKIPPED' "$results/$s.txt" | head -40
  pack "$s"
done

if begin nccl 90; then
  share_for 2
  size=$([ "$device" = sim ] && echo 1M || echo 64M)
  PYTHONPATH="$PYTHONPATH:$repo/tests/gpu/ranks" DPSGS_TEST_DEVICE=$device what="nccl_bench_ranks.py --check" \
    run 150 mpirun -n 2 "${share[@]}" python -m mpi4py tests/gpu/ranks/nccl_bench_ranks.py --check -e "$size" \
    > "$work/nccl/nccl-bench-ranks.txt" 2>&1
  cat "$work/nccl/nccl-bench-ranks.txt"
  if [ "$device" = cuda ]; then
    what="dpsgs bench nccl --check" run 200 mpirun -n 2 "${share[@]}" python -m dpsgs bench nccl --check -e 64M --out "$work/nccl/bench-nccl-2ranks.json" \
      > "$work/nccl/bench-nccl-2ranks.txt" 2>&1
    cat "$work/nccl/bench-nccl-2ranks.txt"
  fi
  pack nccl
fi

if begin bench 120 && [ "$device" = cuda ]; then
  what="dpsgs bench train --device cuda" run 500 python -m dpsgs bench train --device cuda --workload cnn --steps 30 --warmup 5 \
    --out "$work/bench/bench-train-cuda" > "$work/bench/bench-train-cuda.txt" 2>&1
  cat "$work/bench/bench-train-cuda.txt"
  pack bench
fi

finish
