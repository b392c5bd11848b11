"""Bucket assignment (pure): DDP order and caps, dtype separation, oversize parameters."""

from __future__ import annotations

import pytest

from dpsgs.comm.buckets import assign_buckets

MB = 1 << 20


def test_reverse_order_first_bucket_small_then_cap() -> None:
    sizes = [400_000] * 10                         # ten 0.4 MB gradients
    got = assign_buckets(sizes, cap_bytes=MB, first_cap_bytes=500_000)
    assert got == [[9], [8, 7], [6, 5], [4, 3], [2, 1], [0]]


def test_every_parameter_exactly_once_and_caps_hold() -> None:
    sizes = [7, 3000, 12, 999, 5000, 1, 0, 4096, 33]
    got = assign_buckets(sizes, cap_bytes=4096, first_cap_bytes=100)
    flat = sorted(i for b in got for i in b)
    assert flat == list(range(len(sizes)))
    for k, b in enumerate(got):
        total = sum(sizes[i] for i in b)
        assert total <= (100 if k == 0 else 4096) or len(b) == 1, (k, b, total)
        assert b == sorted(b, reverse=True)        # backward order inside a bucket
    assert got[0] == [8]                           # 33 B; adding 4096 B would pass the 100 B cap


def test_oversize_parameter_gets_its_own_bucket() -> None:
    got = assign_buckets([10, 10 * MB, 10], cap_bytes=MB, first_cap_bytes=MB)
    assert got == [[2], [1], [0]]


def test_dtypes_never_share_a_bucket_and_issue_order_is_walk_order() -> None:
    keys = ["f32", "f64", "f32", "f64", "f32"]
    got = assign_buckets([100] * 5, cap_bytes=250, first_cap_bytes=150, keys=keys)
    # walk 4(f32) 3(f64) 2(f32) 1(f64) 0(f32); first buckets hold 100 B each (150 cap)
    assert got == [[4], [3], [2, 0], [1]]
    for b in got:
        assert len({keys[i] for i in b}) == 1


def test_default_25mb_cap_with_1mb_first_bucket() -> None:
    sizes = [4 * MB] * 20
    got = assign_buckets(sizes, cap_bytes=25 * MB, first_cap_bytes=MB)
    assert got[0] == [19]                          # alone: any second one passes 1 MB
    assert [len(b) for b in got[1:]] == [6, 6, 6, 1]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        assign_buckets([1], cap_bytes=0, first_cap_bytes=1)
    with pytest.raises(ValueError, match="2 sizes but 1 keys"):
        assign_buckets([1, 2], 10, 10, keys=["a"])
    assert assign_buckets([], 10, 10) == []
