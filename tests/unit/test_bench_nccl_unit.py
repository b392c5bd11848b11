"""Pure pieces of the NCCL benchmark, without a GPU: the mean check against NCCL's guarantees,
the GPU/rank layout and its header, the summary, why it cannot run, its output names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dpsgs.bench import nccl as bench
from dpsgs.bench.harness import MIB, pattern
from dpsgs.bench.outputs import resolve_out

__all__: list[str] = []


def _nccl_avg(nranks: int, count: int, dtype: str) -> np.ndarray:
    """What ncclAvg computes for floats: every contribution times fl(1/n), summed in order,
    each operation rounded to `dtype` (rank j holds pattern + 2j)."""
    dt = np.dtype(dtype)
    scale = dt.type(1.0) / dt.type(nranks)
    acc = np.zeros(count, dtype=dt)
    for j in range(nranks):
        acc = (acc + pattern(count, dt, 2 * j) * scale).astype(dt)
    return acc


def test_expected_mean_is_pattern_plus_n_minus_1() -> None:
    for n in (1, 2, 3, 5):
        exact = np.mean([pattern(600, np.float64, 2 * j) for j in range(n)], axis=0)
        np.testing.assert_array_equal(bench.expected_mean(600, n), exact)
    assert bench.expected_mean(3, 4).tolist() == [3.0, 4.0, 5.0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("nranks", [2, 3, 4, 5, 6, 7, 8])
def test_a_real_average_passes_and_one_wrong_element_is_counted(dtype: str, nranks: int) -> None:
    got = _nccl_avg(nranks, 2000, dtype)
    assert bench.count_wrong_mean(got, nranks, dtype) == 0
    bad = got.copy()
    bad[[5, 700]] += 1                 # one unit off: far outside any rounding bound
    assert bench.count_wrong_mean(bad, nranks, dtype) == 2
    bad[9] = np.nan
    assert bench.count_wrong_mean(bad, nranks, dtype) == 3


def test_power_of_two_counts_are_exact_and_others_within_the_bound() -> None:
    assert bench.mean_bound(10, 4, "float32") is None and bench.mean_bound(10, 1, "float32") is None
    got = _nccl_avg(4, 500, "float32")
    np.testing.assert_array_equal(got, bench.expected_mean(500, 4))     # 2^k: bit-exact
    off = got.copy()
    off[3] = np.nextafter(off[3], np.float32(np.inf))                    # one ulp is wrong
    assert bench.count_wrong_mean(off, 4, "float32") == 1
    # 3 ranks: the rounding of 1/3 shows, and stays within (n+1)*u*max|x|
    got3 = _nccl_avg(3, 500, "float32").astype(np.float64)
    err = np.abs(got3 - bench.expected_mean(500, 3))
    bound = bench.mean_bound(500, 3, "float32")
    assert err.max() > 0 and np.all(err <= bound)
    assert bound[0] == pytest.approx(4 * 2.0 ** -24 * 4)     # element 0: max|x| = 0 + 2*2
    far = got3.copy()
    far[0] += 10 * bound[0]
    assert bench.count_wrong_mean(far, 3, "float32") == 1


def _slot(host: str, gpu: str, visible: int = 1, name: str = "NVIDIA H200") -> dict:
    return {"host": host, "gpu": gpu, "visible": visible, "name": name}


def test_layout_of_ranks_sharing_one_gpu_says_socket_not_nvlink() -> None:
    layout = bench.gpu_layout([_slot("h", "GPU-a"), _slot("h", "GPU-a")])
    assert layout == {"ranks": 2, "hosts": 1, "gpus_visible": 1, "gpus_used": 1,
                      "ranks_per_gpu": 2, "shared": True, "names": ["NVIDIA H200"]}
    lines = bench.layout_lines(layout)
    assert lines[0] == ("# 2 ranks on 1 host(s): 1 GPU(s) visible, 1 in use (NVIDIA H200), "
                        "at most 2 rank(s) per GPU")
    assert "SHARED GPU" in lines[1] and "socket figures, not NVLink ones" in lines[1]


def test_layout_of_one_gpu_per_rank() -> None:
    slots = [_slot("h1", "GPU-a", 8), _slot("h1", "GPU-b", 8), _slot("h2", "GPU-a", 4)]
    layout = bench.gpu_layout(slots)
    assert (layout["gpus_visible"], layout["gpus_used"], layout["hosts"]) == (12, 3, 2)
    assert layout["ranks_per_gpu"] == 1 and not layout["shared"]
    assert "one GPU per rank" in bench.layout_lines(layout)[1]


def _row(size: int, dp_busbw: float, torch_busbw: float, wrong: int | None = 0) -> dict:
    return {"size": size, "ratio": dp_busbw / torch_busbw,
            "dpsgs": {"busbw": dp_busbw, "wrong": wrong},
            "torch": {"busbw": torch_busbw, "wrong": wrong}}


def test_summary_ratios_average_and_wrong_count() -> None:
    ar = [_row(8, 0.01, 0.02), _row(MIB, 30.0, 40.0), _row(64 * MIB, 90.0, 60.0, wrong=2)]
    ch = [_row(MIB, 5.0, 10.0), _row(64 * MIB, 20.0, 10.0)]
    s = bench.summarize(ar, ch, checked=True)
    assert s["avg_busbw"]["dpsgs"] == pytest.approx(120.01 / 3)
    assert s["allreduce_ratio"] == {"1M": 0.75, "64M": 1.5, "largest": 1.5}
    assert s["channel_ratio"] == {"1M": 0.5, "64M": 2.0, "largest": 2.0}
    assert s["allreduce_ratio_lowest"] == {"ratio": 0.5, "size": 8}
    assert s["wrong"] == 4
    lines = bench.summary_lines(s, {"shared": True, "ranks_per_gpu": 2})
    assert lines[1] == ("# all-reduce busbw dpsgs/torch: 1M 0.75x, 64M 1.50x, largest 1.50x; "
                        "lowest 0.50x at 8 B")
    assert lines[2] == "# channel GB/s dpsgs/torch: 1M 0.50x, 64M 2.00x, largest 2.00x"
    assert "socket figures" in lines[3]
    assert lines[-1] == "# Out of bounds values : 4 FAILED"
    unchecked = bench.summarize(ar, [], checked=False)
    assert unchecked["wrong"] is None and "largest" not in unchecked["channel_ratio"]
    assert bench.summary_lines(unchecked, {})[-1] == "# Out of bounds values : N/A (no --check)"


def test_unavailable_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from dpsgs.comm import nccl as dnccl

    why = "dpsgs._C was built without the NCCL backend (rebuild with DPSGS_CUDA=1)"
    monkeypatch.setattr(dnccl, "available", lambda: (False, why))
    assert bench.unavailable_reason() == why
    monkeypatch.setattr(dnccl, "available", lambda: (True, ""))
    import torch

    if not torch.cuda.is_available():     # this machine: the torch CPU wheel
        assert bench.unavailable_reason() == f"torch {torch.__version__} has no CUDA (a CPU build)"


def test_outputs_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert bench.default_out(2, "20250102-030405") == Path(
        "runs/bench/nccl-2ranks-20250102-030405.json")
    out, refused = resolve_out("dpsgs.bench.nccl", None, False, bench.default_out(4))
    assert refused is None and re.fullmatch(r"runs/bench/nccl-4ranks-\d{8}-\d{6}\.json", out)
    (tmp_path / "mine.json").write_text("{}")
    out, refused = resolve_out("dpsgs.bench.nccl", "mine.json", False, bench.default_out(2))
    assert refused == ("dpsgs.bench.nccl: mine.json already exists (another run's results); "
                       "pass another --out, or --force to overwrite it")
    a = bench.build_parser().parse_args([])
    assert (a.minbytes, a.maxbytes, a.stepfactor, a.iters, a.warmup) == (8, 256 * MIB, 4, 20, 5)
    assert a.dtype == "float32" and not a.check
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["-d", "int8"])
