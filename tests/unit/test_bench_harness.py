"""Pure pieces of the comm benchmark: size parsing and sweep, busbw factor, overlap formula,
verification patterns (no MPI ranks launched)."""

from __future__ import annotations

import numpy as np
import pytest

from dpsgs.bench.allreduce import bus_factor, expected_sum
from dpsgs.bench.harness import Table, format_size, iters_for, parse_size, pattern, size_sweep
from dpsgs.bench.overlap import overlap_percent
from dpsgs.bench.p2p import joined, split, window_for

__all__: list[str] = []


def test_parse_and_format_size() -> None:
    assert [parse_size(s) for s in ("8", "64K", "64M", "1G", "1MiB", "2kb")] == \
        [8, 65536, 64 << 20, 1 << 30, 1 << 20, 2048]
    assert [format_size(n) for n in (8, 65536, 64 << 20, 1000)] == ["8", "64K", "64M", "1000"]
    with pytest.raises(Exception):
        parse_size("lots")


def test_size_sweep_adds_summary_sizes_inside_range() -> None:
    assert size_sweep(8, 128, 4) == [8, 32, 128]
    assert size_sweep(8, 64 << 10, 4)[-2:] == [32 << 10, 64 << 10]   # the end is always in
    assert size_sweep(8, 64 << 20, 4, (8, 1 << 20, 64 << 20))[-1] == 64 << 20
    assert 1 << 20 in size_sweep(8, 64 << 20, 4, (1 << 20,))
    assert size_sweep(8, 100, 4, (1 << 20,)) == [8, 32, 100]
    with pytest.raises(ValueError):
        size_sweep(8, 64, 1)


def test_iteration_and_window_scaling() -> None:
    assert iters_for(8, 20) == 200 and iters_for(1 << 20, 20) == 20
    assert iters_for(64 << 20, 20) == 20
    assert window_for(8, 64, 128 << 20) == 64 and window_for(64 << 20, 64, 128 << 20) == 2
    assert window_for(1 << 30, 64, 128 << 20) == 2


def test_p2p_splits_a_message_into_tensors_that_join_back() -> None:
    buf = np.arange(10, dtype=np.uint8)
    assert [len(a) for a in split(buf, 4)] == [2, 2, 2, 4]          # the last takes the remainder
    assert [len(a) for a in split(np.arange(8, dtype=np.uint8), 16)] == [0] * 15 + [8]
    assert all(a.base is buf for a in split(buf, 3))                 # views: nothing copied
    assert np.array_equal(joined(split(buf, 3)), buf)


def test_busbw_and_overlap_formulas() -> None:
    assert bus_factor(2) == 1.0 and bus_factor(4) == 1.5 and bus_factor(1) == 0.0
    assert overlap_percent(1.0, 1.0, 1.0) == 100.0       # communication fully hidden
    assert overlap_percent(2.0, 1.0, 1.0) == 0.0         # fully serialised
    assert overlap_percent(3.0, 1.0, 1.0) == 0.0         # clamped at 0
    assert overlap_percent(1.5, 1.0, 1.0) == pytest.approx(50.0)
    assert overlap_percent(0.5, 1.0, 1.0) == 100.0       # noise: capped at 100


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_expected_sum_matches_patterns(dtype: str, nranks: int) -> None:
    count = 1000
    total = sum(pattern(count, dtype, r).astype(np.float64) for r in range(nranks))
    np.testing.assert_array_equal(expected_sum(count, np.dtype(dtype), nranks),
                                  total.astype(dtype))


def test_table_aligns_columns_and_prints_na() -> None:
    t = Table("title", [("size", 6), ("x", 7)], [("", 1), ("grp", 1)])
    text = t.render([[8, 1.5], [16, None]])
    lines = text.splitlines()
    assert lines[0] == "# title" and len(lines) == 5
    assert lines[-1].split() == ["16", "N/A"] and len(lines[-1]) == len(lines[-2])
