#!/usr/bin/env bash
# Installs dpsgs like a library and uses it from outside the repository (CI):
#   1. `pip wheel .` with build isolation (pip's own temporary build environment);
#   2. a clean venv elsewhere: the wheel, with mpich + its runtime requirements from pip; the
#      heavy training extras (torch, scikit-learn, matplotlib) are shared from the project's
#      .venv through a .pth file to keep CI fast;
#   3. from a folder outside the repository: the package and its extension come from the
#      venv (not the checkout), `python -m dpsgs --help`, `plan --help`, a 2-rank `train` on
#      the digits data and `bench comm --check` on 2 ranks.
# Usage: bash .ci/install-check.sh   (from the repository root, after scripts/setup.sh)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d -t dpsgs-install.XXXXXX)
trap 'rm -rf "$work"' EXIT
fail() { echo "install-check: FAIL: $*" >&2; exit 1; }
t0=$(date +%s)

echo "== pip wheel (isolated build) into $work/wheels"
"$repo/.venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/wheels" "$repo" \
  > "$work/wheel.log" 2>&1 || { tail -30 "$work/wheel.log"; fail "pip wheel"; }
wheel=$(ls "$work"/wheels/dpsgs-*.whl)
echo "   $(basename "$wheel"): $(python3 -c "import zipfile, sys; n = zipfile.ZipFile(sys.argv[1]).namelist(); \
print(len({p.rsplit('/', 1)[0] for p in n if p.startswith('dpsgs/') and p.endswith('.py')}), 'packages')" "$wheel")"

echo "== clean venv $work/venv"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel" mpich==5.0.2 \
  > "$work/install.log" 2>&1 || { tail -30 "$work/install.log"; fail "pip install"; }
site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
shared=$("$repo/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$shared" > "$site/zz-shared-extras.pth"      # torch & co., after the venv's own packages

mkdir "$work/elsewhere" && cd "$work/elsewhere"
export PATH="$work/venv/bin:$PATH" OMP_NUM_THREADS=1
py="$work/venv/bin/python"
echo "== where the package comes from"
$py -c "import dpsgs, dpsgs._C, sys; f = dpsgs.__file__; print('  ', f); print('  ', dpsgs._C.__file__); \
sys.exit(f.startswith(sys.argv[1]))" "$repo" || fail "dpsgs was imported from the checkout"
readelf -d "$site"/dpsgs/_C*.so | grep -E "RUNPATH|RPATH" | grep -q "pip-build-env" \
  && fail "the extension's rpath points into pip's temporary build environment"
echo "== python -m dpsgs --help / plan --help"
$py -m dpsgs --help > help.txt && grep -q "train" help.txt || fail "dpsgs --help"
$py -m dpsgs plan --help > plan.txt && grep -q -- "--gpus" plan.txt || fail "dpsgs plan --help"
echo "== mpirun -n 2 python -m dpsgs train -K 2 (digits, 1 epoch)"
mpirun -n 2 $py -m dpsgs train -K 2 --dataset digits --epochs 1 --no-progress --run-dir run \
  > train.txt 2>&1 || { tail -20 train.txt; fail "train"; }
grep "final test accuracy" train.txt
echo "== mpirun -n 2 python -m dpsgs bench comm --check (small sizes)"
mpirun -n 2 $py -m dpsgs bench comm --check -e 64K -n 3 -w 1 --out bench \
  > bench.txt 2>&1 || { tail -20 bench.txt; fail "bench comm"; }
grep -q "#wrong" bench.txt || grep -qi "wrong" bench.txt || { tail -20 bench.txt; fail "bench comm printed no check"; }
echo "install-check: OK in $(( $(date +%s) - t0 )) s"
