"""The comm microbenchmark runs end to end under 2 real ranks, verifies its data and writes
the JSON the README describes (fields and ratios only: no timing assertions); by default to
a new file per run, and never over an existing one without --force."""

from __future__ import annotations

import json
import re
from pathlib import Path

from launcher import REPO, run_ranks

__all__: list[str] = []

TINY = ["-b", "8", "-e", "64K", "-n", "3", "-w", "1", "--check"]


def _run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "comm.json"
    run = run_ranks(2, "dpsgs.bench.comm", *TINY, "--out", str(out), *extra, module=True,
                    timeout=180.0)
    assert out.exists(), f"no JSON written\n{run.tail()}"
    return json.loads(out.read_text()), run.stdout


def _common(data: dict, stdout: str) -> None:
    assert data["benchmark"] == "dpsgs.bench.comm"
    assert data["nprocs"] == 2 and data["checked"] is True
    assert data["wrong"] == 0 and data["ok"] is True
    for key in ("hostname", "date", "cpu_model", "cpu_count", "mpi_library", "mpi4py",
                "numpy"):
        assert data["machine"][key], key
    assert "-m dpsgs.bench.comm" in data["command"] and "--check" in data["argv"]
    assert data["sizes"][0] == 8 and data["sizes"][-1] == 65536
    lat, bw = data["p2p"]["latency"], data["p2p"]["bandwidth"]
    assert [r["size"] for r in lat] == data["sizes"] == [r["size"] for r in bw]
    for row in lat:
        assert row["raw"]["wrong"] == 0 and row["raw"]["median_us"] > 0
    for row in data["allreduce"]:
        assert row["variants"]["mpi.Allreduce"]["wrong"] == 0
        assert {"median_us", "algbw", "busbw"} <= set(row["variants"]["mpi.Allreduce"])
        assert row["memcpy"]["gbps"] > 0
    assert all("mpi.Iallreduce" in r for r in data["overlap"])
    for key in ("latency_8B_us", "channel_bw_ratio", "allreduce_busbw_ratio", "overlap_pct",
                "busbw_over_memcpy"):
        assert key in data["summary"], key
    assert "Out of bounds values : 0 OK" in stdout


def test_bench_comm_dpsgs_vs_raw(tmp_path: Path) -> None:
    data, stdout = _run(tmp_path)
    _common(data, stdout)
    assert data["dpsgs"] is True and data["machine"]["dpsgs"]
    for row in data["p2p"]["latency"]:
        assert row["dpsgs"]["wrong"] == 0 and row["ratio"] > 0 and "diff_us" in row
    for row in data["p2p"]["bandwidth"]:
        assert row["ratio"] > 0
    for row in data["allreduce"]:
        for name in ("dpsgs.auto", "dpsgs.ring", "dpsgs.mpi"):
            assert row["variants"][name]["wrong"] == 0, (name, row["size"])
        assert row["ratio"] > 0
    for row in data["overlap"]:
        assert 0 <= row["dpsgs.auto"]["overlap_pct"] <= 100
    assert data["summary"]["latency_8B_us"]["diff"] is not None
    assert "ratio" in stdout and "dpsgs Channel" in stdout


def test_bench_comm_raw_only(tmp_path: Path) -> None:
    """The raw mpi4py side alone (no extension needed): same fields, dpsgs columns N/A."""
    data, stdout = _run(tmp_path, "--raw-only")
    _common(data, stdout)
    assert data["dpsgs"] is False
    assert all("dpsgs" not in r for r in data["p2p"]["latency"])


def test_bench_comm_writes_a_new_file_and_refuses_an_existing_out(tmp_path: Path) -> None:
    """Default: runs/bench/comm-2ranks-<stamp>.json under the working folder, not the
    published bench/results; naming that file again is refused (exit 2) unless --force."""
    published = {p: p.read_bytes() for p in (REPO / "bench" / "results").glob("comm-*")}
    small = ["-b", "8", "-e", "64", "-n", "2", "-w", "0", "--only", "allreduce", "--check"]
    first = run_ranks(2, "dpsgs.bench.comm", *small, module=True, timeout=120.0, cwd=tmp_path)
    made = sorted((tmp_path / "runs" / "bench").iterdir())
    assert len(made) == 1 and re.fullmatch(r"comm-2ranks-\d{8}-\d{6}\.json", made[0].name)
    assert f"# JSON: runs/bench/{made[0].name}" in first.stdout
    assert json.loads(made[0].read_text())["ok"] is True
    kept = made[0].read_bytes()

    again = run_ranks(2, "dpsgs.bench.comm", *small, "--out", str(made[0]), module=True,
                      timeout=60.0, cwd=tmp_path, expect_ok=False)
    assert again.returncode == 2, again.tail()
    assert again.stderr.strip().splitlines() == [
        f"dpsgs.bench.comm: {made[0]} already exists (another run's results); pass another "
        "--out, or --force to overwrite it"]
    assert "# JSON" not in again.stdout and made[0].read_bytes() == kept   # refused up front

    forced = run_ranks(2, "dpsgs.bench.comm", *small, "--out", str(made[0]), "--force",
                       module=True, timeout=120.0, cwd=tmp_path)
    assert f"# JSON: {made[0]}" in forced.stdout
    assert json.loads(made[0].read_text())["argv"][-1] == "--force"
    assert sorted((tmp_path / "runs" / "bench").iterdir()) == made
    assert {p: p.read_bytes() for p in published} == published          # bench/results intact


def test_overlap_compute_runs_on_one_thread_per_rank(tmp_path: Path) -> None:
    """With no thread variable set, NumPy's OpenBLAS would start a thread per core in every
    rank; the bench pins the compute's environment to 1 and says so in its header."""
    import os
    import subprocess
    import sys

    unset = {"OMP_NUM_THREADS": "", "OPENBLAS_NUM_THREADS": "", "MKL_NUM_THREADS": ""}
    probe = "import numpy; from dpsgs.bench.threads import blas_threads; print(blas_threads())"
    unpinned = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              env={**os.environ, **unset, "PYTHONPATH": str(REPO)}, check=True)
    assert int(unpinned.stdout) == os.cpu_count()        # what the bench had before (2 here)
    out = tmp_path / "overlap.json"
    run = run_ranks(2, "dpsgs", "bench", "comm", "--only", "overlap", "-e", "64K", "-n", "2",
                    "-w", "1", "--out", str(out), module=True, env=unset, timeout=120.0)
    header = [ln for ln in run.stdout.splitlines() if ln.startswith("# overlap compute")]
    assert header == ["# overlap compute threads per rank: NumPy ufunc on the calling thread "
                      "(1), BLAS pool 1; OMP_NUM_THREADS=1 (bench), OPENBLAS_NUM_THREADS=1 "
                      "(bench), MKL_NUM_THREADS=1 (bench)"]
    ranks = json.loads(out.read_text())["machine"]["compute_threads"]
    assert len(ranks) == 2
    for r in ranks:
        assert r["blas"] == 1 and r["torch"] is None
        assert r["env"] == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                            "MKL_NUM_THREADS": "1"}
        assert set(r["set_by"].values()) == {"bench"}
