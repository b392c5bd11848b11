#!/usr/bin/env bash
# One call on a GPU machine: set up, build dpsgs._C with NCCL, run the GPU suite (NCCL backend
# and the trainer on CUDA), the NCCL benchmarks with their checks, the main job on CUDA and the
# GPU training benchmark; a summary line at the end, a log and every result under $OUT.
#
#   bash scripts/gpu-check.sh                     # every step, from the repository root
#   bash scripts/gpu-check.sh build tests         # some steps (a lent machine allows 10 min a
#   bash scripts/gpu-check.sh nccl train bench    #   call: split the steps over two calls)
#   bash scripts/gpu-check.sh --fetch-wheels      # beforehand, on a machine with pip access
#
# Steps, in order: build, tests (pytest -m gpu), nccl (the rank program's check and
# `dpsgs bench nccl --check`), train (README command 1 on CUDA in float32 and bf16, and on
# the CPU for comparison), bench (`dpsgs bench train --device cuda`). A step that needs the
# build finds it from an earlier call (the build lives in the working tree).
#
# Set-up: where a folder .whl/ holds MPI wheels (a GPU image with torch/CuPy/NCCL but no MPI
# library, as the lent H200 has: docs/gpu.md), a venv is made over the image's packages and
# the carried wheels (mpich + mpi4py for the image's Python) are installed into it, once; else
# the current environment is used as is (a cluster node with its own MPI and torch).
# Several ranks on one GPU: the launchers give each rank its own NCCL_HOSTID (NCCL then
# treats them as separate hosts, connected by sockets over lo); dpsgs itself never sets it.
set -u
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "${1:-}" = "--fetch-wheels" ]; then
  py=${GPU_PYTHON_VERSION:-3.12}
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl mpich==5.0.2 mpi4py==4.1.2
fi

all_steps=(build tests nccl train bench)
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=("${all_steps[@]}")
for s in "${steps[@]}"; do
  [[ " ${all_steps[*]} " == *" $s "* ]] || { echo "gpu-check: unknown step '$s' (steps: ${all_steps[*]})" >&2; exit 2; }
done
want() { [[ " ${steps[*]} " == *" $1 "* ]]; }

OUT=${OUT:-$repo/build/gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
T0=$(date +%s)
failures=()
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
run() {  # run SECONDS CMD...: bounded, echoed, failure recorded
  local t=$1; shift
  echo "+ $*"
  timeout -k 10 "$t" "$@"
  local rc=$?
  [ $rc -eq 0 ] || failures+=("$* (rc $rc)")
  return $rc
}

step "machine"
nvidia-smi -L 2>&1 | head -8
echo "cores: $(nproc)"

if compgen -G ".whl/*.whl" > /dev/null; then
  step "venv over the image's packages + carried wheels ($(ls .whl | tr '\n' ' '))"
  image_site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  venv=/tmp/dpsgs-gpu-venv
  if [ ! -x "$venv/bin/mpirun" ]; then    # once per machine: a later call reuses it
    python3 -m venv "$venv" && . "$venv/bin/activate"
    run 300 pip install -q --no-index --no-deps --ignore-installed .whl/*.whl || exit 1
    # the venv does not see the image's packages (torch, CuPy, NCCL, pybind11): point it there
    echo "$image_site" > "$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/image-packages.pth"
  fi
  . "$venv/bin/activate"
fi
python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())" || true
echo "mpirun: $(command -v mpirun)"

if want build; then
  step "build dpsgs._C with DPSGS_CUDA=1"
  run 600 env DPSGS_CUDA=1 python setup.py build_ext --inplace -j "$(nproc)" > "$OUT/build.txt" 2>&1 \
    || { tail -40 "$OUT/build.txt"; exit 1; }
fi
python -c "import dpsgs; print(dpsgs.build_info())" || exit 1
python -c "import dpsgs, sys; sys.exit(0 if dpsgs.build_info()['nccl'] else 1)" \
  || { echo "dpsgs._C has no NCCL backend: run the build step first"; exit 1; }
exported=$(nm -D --defined-only dpsgs/_C*.so | awk '{print $NF}')
echo "exported dynamic symbols: $exported"
[ "$exported" = "PyInit__C" ] || failures+=("dpsgs._C exports more than PyInit__C")
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

if want tests; then
  step "GPU suite: pytest -m gpu (NCCL backend; the trainer on CUDA against the reference)"
  run 560 python -m pytest -m gpu -rs -q tests --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1
  tail -60 "$OUT/gpu-tests.txt"
fi

if want nccl; then
  step "NCCL benchmarks with their checks (2 ranks)"
  share_for 2
  PYTHONPATH="$PYTHONPATH:$repo/tests/gpu/ranks" \
    run 200 mpirun -n 2 "${share[@]}" python -m mpi4py tests/gpu/ranks/nccl_bench_ranks.py --check -e 256M \
    > "$OUT/nccl-bench-2ranks.txt" 2>&1
  cat "$OUT/nccl-bench-2ranks.txt"
  run 200 mpirun -n 2 "${share[@]}" python -m dpsgs bench nccl --check -e 256M --out "$OUT/bench-nccl-2ranks.json" \
    > "$OUT/bench-nccl-2ranks.txt" 2>&1
  cat "$OUT/bench-nccl-2ranks.txt"
fi

if want train; then
  step "the main job on CUDA: MLP on digits, K=2 x N=2, 20 epochs (float32, bf16), and on the CPU"
  share_for 4
  job=(-K 2 -N 2 --model mlp --dataset digits --epochs 20 --no-progress)
  for form in "cuda none" "cuda bf16" "cpu none"; do
    set -- $form
    run 300 mpirun -n 4 "${share[@]}" python -m mpi4py -m dpsgs train "${job[@]}" --device "$1" --amp "$2" \
      --run-dir "$OUT/digits-$1-$2" > "$OUT/train-digits-$1-$2.txt" 2>&1 || { tail -5 "$OUT/train-digits-$1-$2.txt"; continue; }
    tail -3 "$OUT/train-digits-$1-$2.txt"
    python - "$OUT/digits-$1-$2/summary.json" <<'PY' || failures+=("digits $1 $2: no summary")
import json, sys
s = json.load(open(sys.argv[1]))
print({k: s[k] for k in ("test_accuracy", "test_loss", "seconds", "samples_per_s") if k in s})
PY
  done
fi

if want bench; then
  step "training throughput on CUDA: dpsgs (fdg, sync) against DDP over NCCL and one GPU"
  run 500 python -m dpsgs bench train --device cuda --workload cnn --steps 30 --warmup 5 \
    --out "$OUT/bench-train-cuda" > "$OUT/bench-train-cuda.txt" 2>&1
  cat "$OUT/bench-train-cuda.txt"
fi

step "summary"
if [ ${#failures[@]} -eq 0 ]; then
  echo "gpu-check: PASS (${steps[*]}) in $(( $(date +%s) - T0 )) s"
  want tests && echo "  tests: $(tail -1 "$OUT/gpu-tests.txt")"
  exit 0
fi
echo "gpu-check: FAIL (${steps[*]}) in $(( $(date +%s) - T0 )) s:"
printf '  - %s\n' "${failures[@]}"
exit 1
