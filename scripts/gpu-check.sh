#!/usr/bin/env bash
# One call on a GPU machine: set up, build dpsgs._C with NCCL, run the whole GPU suite and the
# NCCL benchmark with its check; a summary line at the end, a log under $OUT.
#
#   bash scripts/gpu-check.sh                 # on the GPU machine, from the repository root
#   bash scripts/gpu-check.sh --fetch-wheels  # beforehand, on a machine with pip access
#
# Set-up: where a folder .whl/ holds MPI wheels (a GPU image with torch/CuPy/NCCL but no MPI
# library, as the lent H200 has: docs/gpu.md), a venv is made over the image's packages and
# the carried wheels (mpich + mpi4py for the image's Python) are installed into it; else the
# current environment is used as is (a cluster node with its own MPI and torch).
# Several ranks on one GPU: the test launcher gives each rank its own NCCL_HOSTID (NCCL then
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
  python3 -m venv /tmp/dpsgs-gpu-venv && . /tmp/dpsgs-gpu-venv/bin/activate
  run 300 pip install -q --no-index --no-deps --ignore-installed .whl/*.whl || exit 1
  # the venv does not see the image's packages (torch, CuPy, NCCL, pybind11): point it there
  echo "$image_site" > "$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/image-packages.pth"
fi
python -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())" || true
echo "mpirun: $(command -v mpirun)"

step "build dpsgs._C with DPSGS_CUDA=1"
run 600 env DPSGS_CUDA=1 python setup.py build_ext --inplace > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
python -c "import dpsgs; print(dpsgs.build_info())" || exit 1
exported=$(nm -D --defined-only dpsgs/_C*.so | awk '{print $NF}')
echo "exported dynamic symbols: $exported"
[ "$exported" = "PyInit__C" ] || failures+=("dpsgs._C exports more than PyInit__C")

step "GPU suite: pytest -m gpu (one rank per GPU, else several per GPU)"
run 1500 python -m pytest -m gpu -rs -q tests --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1
tail -60 "$OUT/gpu-tests.txt"

step "NCCL benchmark with its check (2 ranks)"
gpus=$(python -c "from dpsgs import _C; print(_C.cuda_device_count())")
share=()
if [ "$gpus" -lt 2 ]; then
  share=(bash -c 'export NCCL_HOSTID="dpsgs-bench-${PMI_RANK:-${OMPI_COMM_WORLD_RANK:-0}}"; exec "$@"' share-gpu)
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
  echo "(one GPU: 2 ranks share it over NCCL's socket transport; bandwidths are socket figures)"
fi
PYTHONPATH="$repo:$repo/tests/gpu/ranks" NCCL_DEBUG=WARN \
  run 600 mpirun -n 2 "${share[@]}" python -m mpi4py tests/gpu/ranks/nccl_bench_ranks.py --check -e 256M \
  > "$OUT/nccl-bench-2ranks.txt" 2>&1
cat "$OUT/nccl-bench-2ranks.txt"

step "summary"
if [ ${#failures[@]} -eq 0 ]; then
  echo "gpu-check: PASS in $(( $(date +%s) - T0 )) s ($(tail -1 "$OUT/gpu-tests.txt"))"
  exit 0
fi
echo "gpu-check: FAIL in $(( $(date +%s) - T0 )) s:"
printf '  - %s\n' "${failures[@]}"
exit 1
