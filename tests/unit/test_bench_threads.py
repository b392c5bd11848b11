"""The benchmarks' compute threads: unset variables pinned to 1, the user's kept, the loaded
BLAS asked and set at run time, and the header line."""

from __future__ import annotations

import pytest

from dpsgs.bench import threads

__all__: list[str] = []


def test_unset_or_empty_variables_are_pinned_and_the_users_kept() -> None:
    env = {"OMP_NUM_THREADS": "", "MKL_NUM_THREADS": "4", "PATH": "/bin"}
    who = threads.pin_compute_threads(env)
    assert who == {"OMP_NUM_THREADS": "bench", "OPENBLAS_NUM_THREADS": "bench",
                   "MKL_NUM_THREADS": "user"}
    assert env == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "4",
                   "PATH": "/bin"}
    assert threads.pin_compute_threads(env, threads=3) == {v: "user" for v in threads.THREAD_VARS}


def test_the_loaded_blas_is_asked_and_set_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy  # noqa: F401  (loads its OpenBLAS)

    import sys

    before = threads.blas_threads()
    torch = sys.modules.get("torch")
    torch_before = torch.get_num_threads() if torch is not None else None
    if before is None:
        pytest.skip("this NumPy has no BLAS with a thread query")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    try:
        who = threads.pin_compute_threads()       # the real environment: the library is set
        assert who["OPENBLAS_NUM_THREADS"] == "user" and who["OMP_NUM_THREADS"] == "bench"
        assert threads.blas_threads() == 2
        info = threads.compute_threads(who)
        assert info["blas"] == 2 and info["env"]["OPENBLAS_NUM_THREADS"] == "2"
        assert info["env"]["OMP_NUM_THREADS"] == "1" and info["set_by"] == who
    finally:
        for _, lib in threads._loaded_blas():     # leave this process as it was
            fn = threads._function(lib, threads._BLAS["openblas"][2])
            if fn is not None:
                fn(before)
        if torch is not None:
            torch.set_num_threads(torch_before)


def test_threads_line_shows_every_distinct_value() -> None:
    def rank(blas: int, who: str) -> dict:
        return {"env": {v: "1" for v in threads.THREAD_VARS}, "blas": blas, "torch": None,
                "set_by": {v: who for v in threads.THREAD_VARS}}

    assert threads.threads_line([rank(1, "bench"), rank(1, "bench")]) == (
        "# overlap compute threads per rank: NumPy ufunc on the calling thread (1), BLAS pool "
        "1; OMP_NUM_THREADS=1 (bench), OPENBLAS_NUM_THREADS=1 (bench), MKL_NUM_THREADS=1 "
        "(bench)")
    mixed = threads.threads_line([rank(1, "bench"), {**rank(4, "user"), "torch": 1}])
    assert "BLAS pool 1/4, torch 1/None" in mixed and "(bench/user)" in mixed
