"""The NCCL benchmark under real ranks without a GPU: one line and exit 2 where it cannot run,
an existing --out refused first; its sections, check and summary rehearsed on CPU (dpsgs's
MPI Reducer/Channel and gloo standing in for the two NCCL sides)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from launcher import run_ranks

__all__: list[str] = []


def _gloo_env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_without_a_gpu_it_says_why_in_one_line_and_exits_2(tmp_path: Path) -> None:
    from dpsgs.bench.nccl import unavailable_reason

    why = unavailable_reason()
    if why is None:
        pytest.skip("NCCL can run here: tests/gpu covers the real run")
    run = run_ranks(2, "dpsgs", "bench", "nccl", "--check", "-e", "1M", module=True,
                    expect_ok=False, timeout=120.0, cwd=tmp_path)
    assert run.returncode == 2, run.tail()
    assert run.stderr.strip().splitlines() == [f"dpsgs bench nccl: cannot run here: {why}"]
    assert run.stdout == "" and not (tmp_path / "runs").exists()     # nothing measured, written


def test_an_existing_out_is_refused_before_anything(tmp_path: Path) -> None:
    taken = tmp_path / "nccl.json"
    taken.write_text("{}")
    run = run_ranks(2, "dpsgs.bench.nccl", "--out", str(taken), module=True, expect_ok=False,
                    timeout=120.0)
    assert run.returncode == 2, run.tail()
    assert run.stderr.strip().splitlines() == [
        (f"dpsgs.bench.nccl: {taken} already exists (another run's results); pass another "
         "--out, or --force to overwrite it")]
    assert taken.read_text() == "{}"


def _rehearse(tmp_path: Path, nprocs: int, *args: str, ok: bool = True) -> tuple[dict, str]:
    out = tmp_path / "rehearsal.json"
    run = run_ranks(nprocs, "nccl_bench_cpu_ranks.py", str(out), *args, env=_gloo_env(),
                    expect_ok=ok, timeout=180.0)
    assert out.exists(), run.tail()
    assert (run.returncode == 0) == ok, run.tail()     # exit 1 (MPI_Abort) on wrong data
    return json.loads(out.read_text()), run.stdout


@pytest.mark.parametrize("nprocs,dtype", [(2, "float32"), (3, "float64")])
def test_cpu_rehearsal_checks_every_row(tmp_path: Path, nprocs: int, dtype: str) -> None:
    data, stdout = _rehearse(tmp_path, nprocs, "--dtype", dtype)
    sizes = [s for s in data["sizes"] if s >= 8]
    assert [r["size"] for r in data["allreduce"]] == sizes == [8, 64, 512, 4096, 32768, 65536]
    for r in data["allreduce"]:
        assert r["type"] == dtype and r["redop"] == "mean" and r["torch_redop"] == "sum+div"
        assert r["count"] * (4 if dtype == "float32" else 8) == r["size"]
        for side in ("dpsgs", "torch"):
            assert r[side]["wrong"] == 0 and r[side]["time_us"] > 0
            assert r[side]["busbw"] == pytest.approx(r[side]["algbw"] * 2 * (nprocs - 1) / nprocs)
        assert r["ratio"] == pytest.approx(r["dpsgs"]["algbw"] / r["torch"]["algbw"])
    if nprocs == 2:
        rows = data["channel"]["rows"]
        assert [r["size"] for r in rows] == sizes
        assert all(r[side]["wrong"] == 0 and r[side]["gbps"] > 0
                   for r in rows for side in ("dpsgs", "torch"))
    else:
        assert data["channel"] == {"rows": [], "note": "needs exactly 2 ranks (ran with 3)"}
        assert "# channel: not measured: needs exactly 2 ranks (ran with 3)" in stdout
    assert data["summary"]["wrong"] == 0 and "# Out of bounds values : 0 OK" in stdout
    assert "dpsgs TensorReducer (ncclAvg)" in stdout and "torch all_reduce (SUM, /n)" in stdout


def test_cpu_rehearsal_counts_wrong_elements_and_exits_1(tmp_path: Path) -> None:
    # rank 0 spoils element 0 of every dpsgs all-reduce result: rank 0 is off the mean (1),
    # rank 1's bits differ from rank 0's there (1); rank 1 spoils each message received (1)
    data, stdout = _rehearse(tmp_path, 2, "--corrupt", ok=False)
    assert [r["dpsgs"]["wrong"] for r in data["allreduce"]] == [2] * 6
    assert [r["torch"]["wrong"] for r in data["allreduce"]] == [0] * 6
    assert [r["dpsgs"]["wrong"] for r in data["channel"]["rows"]] == [1] * 6
    assert data["summary"]["wrong"] == 18 and "# Out of bounds values : 18 FAILED" in stdout
