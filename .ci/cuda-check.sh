#!/usr/bin/env bash
# CUDA/NCCL compile-and-link check (CI; no GPU needed). In the active venv:
#   1. installs nvidia-nccl-cu12 (headers + libnccl.so.2) if it is missing;
#   2. builds dpsgs._C with DPSGS_CUDA=1 into a SEPARATE dir (never the in-place module);
#   3. checks with nm -D that the .so references the NCCL/CUDA entry points the backend uses and
#      exports PyInit__C alone, and with ldd that libnccl.so.2 and libcudart resolve;
#   4. imports that build in a subprocess and checks build_info() says nccl: true + version.
# Loading needs no GPU; only NCCL/CUDA calls would fail. Exits non-zero on any failure.
# Usage: bash .ci/cuda-check.sh          (from the repo root or anywhere; venv active)
set -euo pipefail
cd "$(dirname "$0")/.."
NCCL_WHEEL=${NCCL_WHEEL:-nvidia-nccl-cu12==2.32.3}
OUT=build/cuda-check
TMP=build/cuda-check-tmp

fail() { echo "cuda-check: FAIL: $*" >&2; exit 1; }

echo "== cuda-check: python $(python -c 'import sys; print(sys.executable)')"
if ! python -c "import nvidia.nccl" 2>/dev/null; then
  echo "== installing $NCCL_WHEEL"
  pip install -q --disable-pip-version-check "$NCCL_WHEEL"
fi
python -c "import nvidia.nccl, os; p = nvidia.nccl.__path__[0]; \
assert os.path.exists(os.path.join(p, 'include', 'nccl.h')), 'nccl.h missing in ' + p" \
  || fail "the NCCL wheel has no include/nccl.h"

# libstdc++ linked statically, as the GPU machine's module-built g++ does (docs/gpu.md): the
# export map must still keep the module's copy away from torch (tests/unit/test_exports.py
# checks the CPU build the same way; it is `slow`, this build is CI's check of it)
echo "== building dpsgs._C with DPSGS_CUDA=1, LDFLAGS=-static-libstdc++ into $OUT"
rm -rf "$OUT"
mkdir -p "$(dirname "$TMP")"
if ! DPSGS_CUDA=1 LDFLAGS="-static-libstdc++ ${LDFLAGS:-}" python setup.py -q build_ext -j 2 --build-lib "$OUT" --build-temp "$TMP" > "$TMP.log" 2>&1; then
  tail -40 "$TMP.log" >&2
  fail "build with DPSGS_CUDA=1 failed (log: $TMP.log)"
fi
grep -E "NCCL backend ON" "$TMP.log" || true
SO=$(ls "$OUT"/dpsgs/_C*.so 2>/dev/null | head -1)
[ -n "$SO" ] || fail "no _C*.so in $OUT/dpsgs"
echo "== built $SO"

echo "== nm -D: NCCL/CUDA symbols the backend calls"
symbols=$(nm -D --undefined-only "$SO")
for sym in ncclAllReduce ncclSend ncclRecv ncclGroupStart ncclGroupEnd ncclCommInitRankConfig ncclCommSplit \
           ncclCommFinalize ncclCommDestroy ncclCommAbort ncclCommGetAsyncError ncclGetUniqueId ncclGetErrorString \
           cudaStreamCreateWithFlags cudaEventRecord cudaEventQuery cudaStreamWaitEvent; do
  line=$(grep -E " U ${sym}(@|$)" <<< "$symbols") || fail "$SO does not reference $sym"
  echo "  $line"
done

echo "== nm -D --defined-only: the module exports PyInit__C alone"
exported=$(nm -D --defined-only "$SO" | awk '{print $NF}')
[ "$exported" = "PyInit__C" ] || fail "$SO exports $(wc -w <<< "$exported") symbols, not just PyInit__C: $(head -c 300 <<< "$exported")"
echo "  $exported"

readelf -d "$SO" | grep -q "NEEDED.*libstdc++" && fail "libstdc++ was not linked statically (LDFLAGS ignored?)"

echo "== ldd: libraries resolve"
libs=$(ldd "$SO")
if grep -q "not found" <<< "$libs"; then
  grep "not found" <<< "$libs" >&2
  fail "unresolved libraries"
fi
grep -E "libnccl\.so\.2 => /" <<< "$libs" || fail "libnccl.so.2 not linked/resolved"
grep -E "libcudart\.so[.0-9]* => /" <<< "$libs" || fail "libcudart not linked/resolved"

echo "== importing the built module (separate dir, subprocess)"
for order in C-then-torch torch-then-C; do
python - "$SO" "$order" <<'PY' || fail "the NCCL build does not import ($order) or does not report NCCL"
import importlib.util
import sys

path, order = sys.argv[1], sys.argv[2]
if order == "torch-then-C":
    import torch
# Load this file by path: the repository's own dpsgs package (in-place build) must not shadow it.
spec = importlib.util.spec_from_file_location("dpsgs._C", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
info = dict(mod.build_info())
print("  build_info():", info)
assert info.get("nccl") is True, "build_info() says nccl is not compiled in"
assert info.get("nccl_version"), "no NCCL version reported"
for name in ("NcclCommunicator", "NcclChannel", "NcclReducer", "NcclWork", "nccl_close_all"):
    assert hasattr(mod, name), f"{name} missing from the module"
gpus = mod.cuda_device_count()
print(f"  loaded libnccl {mod.nccl_version()} (compiled against {mod.nccl_header_version()}), "
      f"CUDA runtime {info.get('cuda_version')}, {gpus} GPU(s) visible")
with open(path + ".gpus", "w") as f:
    f.write(str(gpus))
import torch  # noqa: E402 - after the module (C-then-torch): torch must not use the module's libstdc++
x = torch.arange(1000, dtype=torch.float64).reshape(10, 100)
assert float((x @ x.T).trace()) > 0
print(f"  {order}: torch {torch.__version__} works beside it")
PY
done
gpus=$(cat "$SO.gpus")
rm -f "$SO.gpus"
if [ "$gpus" = "0" ]; then
  echo "CUDA/NCCL backend: compiled and linked (not run: no GPU)"
else
  echo "CUDA/NCCL backend: compiled and linked; $gpus GPU(s) visible: run the suite in docs/gpu.md"
fi
