#!/usr/bin/env bash
# Checks of the GPU code path on the CPU simulator (DPSGS_CUDA=sim, csrc/sim/sim.h) that need
# a build of their own. Each builds a temporary copy of the tree (the working tree as it is,
# untracked files included) with the repository's .venv, so the in-place module is never
# touched. Not part of CI: each is a full build plus a suite run (minutes each here).
#
#   bash scripts/sim-checks.sh teeth [wait|owner ...]   # planted bugs must fail the sim suite
#   bash scripts/sim-checks.sh tsan                     # ThreadSanitizer over the NCCL tests
#   bash scripts/sim-checks.sh coverage                 # gcov line coverage of csrc/cuda/
#
# teeth: each mutant edits csrc/cuda/nccl_channel.cc in the copy, and the sim NCCL suite
#   (tests/gpu/test_nccl.py, sim variants) must fail; the failing tests are named. Exit 0
#   only if every mutant was caught and still applies (a refactor that moves the code makes
#   this fail, not pass quietly).
#     wait   the channel stream's wait for the producer's event in NcclChannel::issue: a
#            send no longer waits for the kernels that produced its buffer
#     owner  the buffer owner of NcclChannel::send: the Work no longer keeps the sent
#            tensors alive, so they may be freed and reused while ncclSend reads them
# tsan: -fsanitize=thread (libtsan preloaded into every rank: python itself is not
#   instrumented); prints the number of ThreadSanitizer reports in dpsgs code, 0 to pass.
# coverage: --coverage -O0; the whole sim suite of tests/gpu, then gcov per csrc/cuda file.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/.venv/bin/activate"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
what=${1:-}
shift || true

copy_tree() {  # copy_tree: a fresh copy of the working tree; prints its path
  local tmp
  tmp=$(mktemp -d "/tmp/dpsgs-sim-$what-XXXXXX")
  (cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$tmp"
  echo "$tmp"
}

build() {  # build DIR [CFLAGS [LDFLAGS]]: the sim variant in place in DIR
  echo "--- building $1 (DPSGS_CUDA=sim ${2:-})"
  # setuptools takes C++ flags from CXXFLAGS (C files: CFLAGS), link flags from LDFLAGS
  (cd "$1" && DPSGS_CUDA=sim CFLAGS="${2:-}" CXXFLAGS="${2:-}" LDFLAGS="${3:-}" python setup.py -q build_ext \
     --inplace > build.log 2>&1) || { tail -30 "$1/build.log"; echo "sim-checks: the build failed" >&2; exit 2; }
  if [ -n "${2:-}" ]; then  # the flags must have reached the compiler
    local flag=${2%% *} obj
    obj=$(find "$1/build" -name cuda_runtime.o | head -1)
    case "$flag" in
      # grep -c, not -q: under pipefail grep -q leaving early makes nm fail on SIGPIPE
      -fsanitize=thread) nm "$obj" | grep -c __tsan_func_entry > /dev/null ;;
      --coverage) nm "$obj" | grep -c __gcov > /dev/null ;;
    esac || { echo "sim-checks: $flag did not reach the compiler" >&2; exit 2; }
  fi
}

plant() {  # plant MUTANT DIR
  local f="$2/csrc/cuda/nccl_channel.cc" before
  before=$(md5sum < "$f")
  case "$1" in
    wait)  sed -i '/cudaStreamWaitEvent(stream->get(), ready->get(), 0)/d' "$f" ;;
    owner) sed -i '/issue("send"/s/std::move(owner)/Owner()/' "$f" ;;
    *) echo "sim-checks: unknown mutant '$1' (wait, owner)" >&2; exit 2 ;;
  esac
  [ "$before" != "$(md5sum < "$f")" ] \
    || { echo "sim-checks: mutant '$1' no longer applies to csrc/cuda/nccl_channel.cc: update this script" >&2; exit 2; }
  diff -u "$repo/csrc/cuda/nccl_channel.cc" "$f" | grep -E '^[-+][^-+]' | sed 's/^/    /' || true
}

ran_all() {  # ran_all PYTEST_LOG: fail unless the tests ran (a skip here means the build did not load)
  if ! tail -1 "$1" | grep -q passed || tail -1 "$1" | grep -q skipped; then
    echo "sim-checks: the suite did not run (see $1)" >&2
    grep -E '^SKIPPED' "$1" | head -3 >&2
    exit 2
  fi
}

teeth() {
  local mutants=("$@") missed=()
  [ ${#mutants[@]} -gt 0 ] || mutants=(wait owner)
  for m in "${mutants[@]}"; do
    local tmp rc caught
    tmp=$(copy_tree)
    echo "=== mutant '$m' ($tmp)"
    plant "$m" "$tmp"
    build "$tmp"
    set +e
    (cd "$tmp" && python -m pytest tests/gpu/test_nccl.py -k sim -q -p no:cacheprovider -rf > pytest.log 2>&1)
    rc=$?
    set -e
    caught=$(sed -nE 's/^FAILED ([^ ]+).*/\1/p' "$tmp/pytest.log")
    tail -1 "$tmp/pytest.log"
    if [ $rc -ne 0 ] && [ -n "$caught" ]; then
      echo "caught '$m' by:"; sed 's/^/  /' <<< "$caught"
      rm -rf "$tmp"
    else
      echo "NOT CAUGHT: mutant '$m' passed the sim suite (log: $tmp/pytest.log)"
      missed+=("$m")
    fi
  done
  [ ${#missed[@]} -eq 0 ] || { echo "sim-checks teeth: FAIL: not caught: ${missed[*]}"; exit 1; }
  echo "sim-checks teeth: every planted bug was caught"
}

tsan() {
  local tmp logs n
  tmp=$(copy_tree)
  build "$tmp" "-fsanitize=thread -g -O1" "-fsanitize=thread"
  logs=$tmp/tsan
  mkdir -p "$logs"
  # Every rank (mpirun passes the environment on) loads the TSan runtime first; reports go
  # to one file per process; the tests' own deadlines still hold (TSan slows code ~5-15x).
  export LD_PRELOAD
  LD_PRELOAD=$(gcc -print-file-name=libtsan.so)
  export TSAN_OPTIONS="log_path=$logs/report exitcode=0 report_signal_unsafe=0 second_deadlock_stack=1"
  # UCX (MPICH's transport) hooks mmap/munmap for its memory events, as TSan does: with both,
  # every process crashes in MPI_Finalize. MPI does not need the events here (no GPU memory).
  export UCX_MEM_EVENTS=no
  # Under TSan (5-15x slower) the two heaviest programs run here with smaller workloads (their
  # tests' 600 s would not do), and the test whose launcher wraps ranks in bash is left out
  # (bash itself crashes with the TSan runtime preloaded).
  set +e
  (cd "$tmp" && python -m pytest tests/gpu/test_nccl.py tests/gpu/test_sim_hooks.py -q -p no:cacheprovider -rf \
     -k "sim and not byte_exact and not allreduce_means and not distinct_nccl_hostids" > pytest.log 2>&1)
  local rc=0 n
  for n in 2 3; do
    (cd "$tmp" && DPSGS_TEST_DEVICE=sim PYTHONPATH="$tmp:$tmp/tests/gpu/ranks:$tmp/tests/mpi/ranks" timeout 900 \
       mpirun -n $n python -m mpi4py tests/gpu/ranks/nccl_allreduce_ranks.py 4099 >> ranks.log 2>&1) || rc=1
  done
  (cd "$tmp" && DPSGS_TEST_DEVICE=sim PYTHONPATH="$tmp:$tmp/tests/gpu/ranks:$tmp/tests/mpi/ranks" timeout 900 \
     mpirun -n 2 python -m mpi4py tests/gpu/ranks/nccl_channel_ranks.py 200 >> ranks.log 2>&1) || rc=1
  set -e
  unset LD_PRELOAD
  tail -3 "$tmp/pytest.log"
  ran_all "$tmp/pytest.log"
  grep -E "OK|FAIL" "$tmp/ranks.log" | sed 's/^/  /'
  [ $rc -eq 0 ] || echo "sim-checks: a rank program failed under TSan (log: $tmp/ranks.log)"
  n=$(cat "$logs"/report* 2>/dev/null | grep -c '^WARNING: ThreadSanitizer' || true)
  echo "ThreadSanitizer reports: $n (files: $logs)"
  if [ "$n" -gt 0 ]; then
    cat "$logs"/report* | grep -E '^WARNING: ThreadSanitizer|^    #[0-3] ' | head -60
    exit 1
  fi
}

coverage() {
  local tmp
  tmp=$(copy_tree)
  build "$tmp" "--coverage -O0 -DDPSGS_COVERAGE" "--coverage"
  set +e
  (cd "$tmp" && python -m pytest tests/gpu -m "not gpu" -q -p no:cacheprovider -rf > pytest.log 2>&1)
  set -e
  tail -2 "$tmp/pytest.log"
  ran_all "$tmp/pytest.log"
  (cd "$tmp" && python - <<'PY'
import glob, os, re, subprocess
total = hit = 0
rows = []
for src in sorted(glob.glob("csrc/cuda/*.cc")):
    gcda = glob.glob(f"build/**/{os.path.splitext(src)[0]}.gcda", recursive=True)
    if not gcda:
        rows.append((src, 0, 0, "not run"))
        continue
    out = subprocess.run(["gcov", "-n", "-o", os.path.dirname(gcda[0]), src], capture_output=True, text=True).stdout
    m = re.search(rf"File '{re.escape(src)}'\nLines executed:([\d.]+)% of (\d+)", out)
    pct, n = float(m.group(1)), int(m.group(2))
    total += n
    hit += round(pct * n / 100)
    rows.append((src, pct, n, ""))
for src, pct, n, note in rows:
    print(f"  {src:34} {pct:6.1f}% of {n:4} lines {note}")
print(f"csrc/cuda/ line coverage: {100 * hit / max(total, 1):.1f}% of {total} lines")
PY
  )
  echo "(annotated sources: cd $tmp && gcov -o build/... csrc/cuda/<file>.cc)"
}

case "$what" in
  teeth) teeth "$@" ;;
  tsan) tsan ;;
  coverage) coverage ;;
  *) echo "usage: bash scripts/sim-checks.sh teeth [wait|owner ...] | tsan | coverage" >&2; exit 2 ;;
esac
