"""Grid math rank <-> (replica, stage) and the stage/pipeline group split (no MPI)."""

from __future__ import annotations

import pytest

from dpsgs.comm.grid import Grid, make_groups


@pytest.mark.parametrize("K,N", [(1, 1), (1, 4), (4, 1), (2, 2), (3, 2)])
def test_grid(K, N):
    g = Grid(K, N)
    assert g.size == K * N
    for rank in range(K * N):
        r, k = g.coords(rank)
        assert rank == r * K + k == g.rank(r, k)
    groups = [g.stage_group(k) for k in range(K)]
    pipes = [g.pipeline_group(r) for r in range(N)]
    # every rank in exactly one stage group and one pipeline; they cross in one rank
    assert sorted(sum(groups, [])) == sorted(sum(pipes, [])) == list(range(K * N))
    for k in range(K):
        for r in range(N):
            assert set(groups[k]) & set(pipes[r]) == {r * K + k}
    assert pipes[0] == list(range(K))          # a replica's stages are consecutive ranks


def test_grid_examples():
    g = Grid(3, 2)
    assert g.stage_group(1) == [1, 4]
    assert g.pipeline_group(1) == [3, 4, 5]
    assert g.coords(5) == (1, 2)


def test_check_world_message():
    Grid(2, 2).check_world(4)
    with pytest.raises(ValueError, match=r"world size 3 .*K\*N = 2\*2 = 4"):
        Grid(2, 2).check_world(3)


@pytest.mark.parametrize("bad", [(0, 1), (1, 0), (2.0, 1), (-1, 2)])
def test_bad_grid(bad):
    with pytest.raises(ValueError):
        Grid(*bad)


def test_out_of_range():
    g = Grid(2, 3)
    with pytest.raises(ValueError, match="rank 6 out of range"):
        g.coords(6)
    with pytest.raises(ValueError, match="stage 2 out of range"):
        g.rank(0, 2)
    with pytest.raises(ValueError, match="replica 3 out of range"):
        g.pipeline_group(3)


class _FakeComm:
    """Records split(color, key) calls the way a _C.Communicator would receive them."""

    def __init__(self, rank, size):
        self.rank, self.size, self.calls = rank, size, []

    def split(self, color, key):
        self.calls.append((color, key))
        return (color, key)


def test_make_groups_colors():
    g = Grid(3, 2)
    for rank in range(6):
        c = _FakeComm(rank, 6)
        stage_comm, pipe_comm = make_groups(g, rank, c.split)
        r, k = g.coords(rank)
        assert c.calls == [(k, r), (r, k)]      # stage group first, ordered by replica
        assert (stage_comm, pipe_comm) == ((k, r), (r, k))
    with pytest.raises(ValueError, match="rank 6 out of range"):
        make_groups(g, 6, _FakeComm(6, 7).split)


def test_label_names_replica_and_stage():
    assert Grid(2, 3).label(5) == "rank 5 (replica 2, stage 1)"
