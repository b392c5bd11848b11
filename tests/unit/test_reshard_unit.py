"""Resharding in one process: a checkpoint's stage shards read as one model and cut for any
grid reassemble bit-identically (BatchNorm model, SGD momentum and AdamW), the BatchNorm rule,
export's --bn average, and each refusal's message."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dpsgs.config import TrainConfig
from dpsgs.job.checkpoint import CheckpointError, read_manifest, shard_entry
from dpsgs.job.export import export_state_dict, format_inspect, inspect
from dpsgs.job.reshard import ReshardError, check_reshard, data_position, describe, regrid
from dpsgs.job.run_setup import prepare
from dpsgs.job.whole_state import (EMPTY_PIPELINE, read_whole, shards_holding, stage_state,
                                   trainable_names, whole_from_shards)


class Grid:
    def __init__(self, k: int, n: int) -> None:
        self.stages, self.replicas = k, n


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
                         nn.Linear(12, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 10))


def _data() -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    return (x, torch.randint(0, 10, (64,), generator=g)), (x[:16], torch.randint(0, 10, (16,), generator=g))


def _cut(config: TrainConfig, trained: nn.Module | None = None) -> list[list[dict]]:
    """Per replica, per stage: (module, optimizer) of `config`'s grid (fresh, seeded)."""
    setup = prepare(config, model=_model(), data=_data())
    return [[_stage(setup, r, k) for k in range(config.stages)] for r in range(config.replicas)]


def _stage(setup, r: int, k: int) -> dict:
    module = setup.stage_module(r, k)
    opt = setup.make_optimizer([p for p in module.parameters() if p.requires_grad])
    return {"module": module, "opt": opt}


def _train_a_little(grid: list[list[dict]]) -> None:
    """Give every parameter a gradient and a step, and each replica its own BN statistics."""
    for r, row in enumerate(grid):
        for k, st in enumerate(row):
            for p in st["module"].parameters():
                p.grad = torch.randn_like(p) * (k + 1)
            st["opt"].step(0)
            for name, b in st["module"].named_buffers():
                if b.is_floating_point():
                    b.add_(r + 0.5)


def _shards(grid: list[list[dict]]) -> list[dict]:
    """What Checkpointer.save writes: replica 0's state per stage, every replica's buffers."""
    shards = []
    for k, st in enumerate(grid[0]):
        m = st["module"]
        shards.append({"model": {n: t.clone() for n, t in m.state_dict().items()},
                       "optimizer": st["opt"].state_dict(), "param_names": trainable_names(m),
                       "epoch": 1, "batch": 0, "iterations": 8, "global_step": 10,
                       "replica_buffers": {r: {n: b.clone() for n, b in row[k]["module"].named_buffers()}
                                           for r, row in enumerate(grid)}})
    return shards


def _same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype, where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("target", [(1, 2), (2, 1), (4, 1), (1, 4), (3, 1)])
def test_cut_and_reassembled_is_bit_identical(optimizer: str, target: tuple[int, int]) -> None:
    base = TrainConfig(stages=2, replicas=2, optimizer=optimizer, batch_size=8, split=None)
    src = _cut(base)
    _train_a_little(src)
    saved = whole_from_shards(_shards(src), 2, 2)
    assert saved.optimizer and len(saved.replica_buffers) == 2
    for k, n in (target, (2, 2)):
        grid = _cut(TrainConfig(stages=k, replicas=n, optimizer=optimizer, batch_size=8))
        for r, row in enumerate(grid):
            for st in row:
                state, buffers = stage_state(saved, st["module"], r)
                st["module"].load_state_dict({**state["model"], **(buffers or {})})
                st["opt"].load_state_dict(state["optimizer"])
        back = whole_from_shards(_shards(grid), k, n)
        _same(saved.model, back.model, f"{k}x{n} model")
        _same(saved.optimizer, back.optimizer, f"{k}x{n} optimizer")
        assert saved.hyper == back.hyper
        # BatchNorm: replica r < N keeps its own, a new one takes replica 0's
        for r in range(n):
            _same(saved.replica_buffers[min(r, 1) if r < 2 else 0], back.replica_buffers[r],
                  f"{k}x{n} replica {r} buffers")
        saved = back if (k, n) == (2, 2) else saved


def _write(folder: Path, stages: int, replicas: int, shards: list[dict], meta: dict) -> Path:
    """A committed checkpoint as dpsgs.job.checkpoint writes one (no MPI)."""
    folder.mkdir(parents=True)
    rows = []
    for k, st in enumerate(shards):
        buf = io.BytesIO()
        torch.save({"format": "dpsgs-checkpoint", "stage": k, "stages": stages, "state": st}, buf)
        data = buf.getvalue()
        (folder / f"stage{k}.pt").write_bytes(data)
        rows.append(shard_entry(k, data, st))
    (folder / "manifest.json").write_text(json.dumps(
        {"format": "dpsgs-checkpoint", "version": 1, "tag": folder.name, "stages": stages,
         "replicas": replicas, "created": 0.0, "meta": meta, "shards": rows}))
    return folder


def _checkpoint(tmp_path: Path, **meta) -> Path:
    src = _cut(TrainConfig(stages=2, replicas=2, batch_size=8))
    _train_a_little(src)
    meta = {"model": "mlp", "epoch": 1, "batch": 0, "step": 8, "global_step": 10, "run_id": "r",
            "split": ["2"], "param_names": "module paths", "batch_size": 8,
            "pipeline": EMPTY_PIPELINE, **meta}
    return _write(tmp_path / "checkpoints" / "epoch1", 2, 2, _shards(src), meta)


def test_export_average_means_float_buffers_and_keeps_replica_0s_counts(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    whole = read_whole(ckpt)
    one, avg = export_state_dict(tmp_path), export_state_dict(ckpt, bn="average")
    assert one.keys() == avg.keys() == _model().state_dict().keys()
    _same(one["2.running_mean"], whole.replica_buffers[0]["2.running_mean"], "replica 0")
    want = (whole.replica_buffers[0]["2.running_var"] + whole.replica_buffers[1]["2.running_var"]) / 2
    assert torch.allclose(avg["2.running_var"], want, rtol=0, atol=1e-7)
    assert not torch.equal(avg["2.running_var"], one["2.running_var"])
    _same(avg["2.num_batches_tracked"], one["2.num_batches_tracked"], "count")
    _same(avg["1.weight"], one["1.weight"], "weight")
    model = _model()
    model.load_state_dict(avg)          # strict
    with pytest.raises(ValueError, match="--bn must be one of replica0, average"):
        export_state_dict(ckpt, bn="mean")


def test_inspect_names_grid_position_and_integrity(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    info = inspect(tmp_path)
    assert (info["stages"], info["replicas"], info["epoch"], info["run_id"]) == (2, 2, 1, "r")
    assert info["integrity"] == "ok" and info["pipeline_empty"]
    assert [s["replica_buffers"] for s in info["shards"]] == [[0, 1], [0, 1]]
    text = format_inspect(info)
    assert "grid: K=2 stages x N=2 replicas; split before '2'" in text
    assert "integrity: ok" in text
    data = (ckpt / "stage1.pt").read_bytes()
    (ckpt / "stage1.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    info = inspect(ckpt)
    assert info["integrity"] == f"shard {ckpt / 'stage1.pt'} is corrupt: its SHA-256 differs from the manifest's"
    with pytest.raises(CheckpointError, match="cannot be exported: shard .* is corrupt"):
        export_state_dict(ckpt)


def test_refusals_name_the_rule(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    here = TrainConfig(stages=1, replicas=2, batch_size=8)
    with pytest.raises(CheckpointError, match=r"was written by a 2x2 grid .* this run is 1x2 .*"
                       r"or name the change with --override stages \(the checkpoint is resharded\)"):
        check_reshard(ckpt, Grid(1, 2), here, 8)
    assert check_reshard(ckpt, Grid(1, 2), TrainConfig(stages=1, replicas=2, override=["stages"]), 8)
    assert not check_reshard(ckpt, Grid(2, 2), TrainConfig(stages=2, replicas=2, split=["2"]), 8)
    # another split at the same K, named: resharded (it used to be ignored for the checkpoint's)
    assert check_reshard(ckpt, Grid(2, 2), TrainConfig(stages=2, replicas=2, split=["4"],
                                                       override=["split"]), 8)
    old = _checkpoint(tmp_path / "old", pipeline=None)
    with pytest.raises(CheckpointError, match=r"cannot be resharded to 1x2: it does not record that "
                       r"its pipeline was empty .* resume it on its own grid, -K 2 -N 2"):
        check_reshard(old, Grid(1, 2), TrainConfig(stages=1, replicas=2, override=["stages"]), 8)
    # data position: batch 3 of global batch 16 = sample 48; a global batch of 32 cuts a batch
    meta = {"epoch": 1, "batch": 3}
    assert data_position(meta, 2, 8, TrainConfig(replicas=1, batch_size=16), 8, "c") == 3
    assert data_position(meta, 2, 8, TrainConfig(replicas=1, batch_size=24), 8, "c") == 2
    with pytest.raises(ReshardError, match="stops at sample 48 of epoch 1 .* the new global batch "
                       "32 does not divide it"):
        data_position(meta, 2, 8, TrainConfig(replicas=2, batch_size=16), 8, "c")


def test_regrid_keeps_the_global_batch_and_elastic_takes_n_from_the_world(tmp_path: Path) -> None:
    _checkpoint(tmp_path)
    cfg = TrainConfig(stages=1, replicas=1, batch_size=8, run_dir=str(tmp_path), resume="auto",
                      override=["stages"])
    new, notes = regrid(cfg, 1)
    assert (new.replicas, new.batch_size) == (1, 16)
    assert set(new.override) == {"stages", "split", "batch_size"}
    assert notes == ["dpsgs: N=2 -> N=1: per-replica batch 8 -> 16, keeping the global batch 16"]
    with pytest.raises(ReshardError, match=r"its global batch 16 \(N=2 x batch 8\) does not divide "
                       r"into N=3 replicas; .* --batch-size B --override batch_size"):
        regrid(TrainConfig(stages=2, replicas=3, batch_size=8, run_dir=str(tmp_path),
                           resume="auto", override=["replicas"]), 6)
    mine, _ = regrid(TrainConfig(stages=2, replicas=1, batch_size=4, run_dir=str(tmp_path),
                                 resume="auto", override=["replicas", "batch_size"]), 2)
    assert mine.batch_size == 4                       # named: taken as given
    # an elastic chain repeats the first launch's --batch-size: the global batch still rules
    again, notes = regrid(TrainConfig(stages=2, replicas=4, batch_size=2, run_dir=str(tmp_path),
                                      resume="auto", override=["replicas"]), 8)
    assert again.batch_size == 4 and notes == [
        "dpsgs: N=2 -> N=4: per-replica batch 8 -> 4, keeping the global batch 16 (--batch-size 2 "
        "is not used: name --override batch_size to change the global batch)"]
    el, notes = regrid(TrainConfig(stages=2, replicas=2, batch_size=8, run_dir=str(tmp_path),
                                   resume="auto", elastic=True), 2)
    assert (el.stages, el.replicas, el.batch_size) == (2, 1, 16)
    assert notes[0] == "dpsgs: --elastic: 2 ranks, so K=2 x N=1 (-N 2 was given)"
    with pytest.raises(ReshardError, match="--elastic: 3 ranks are not a multiple of K=2 stages; "
                       "launch a multiple of 2 ranks"):
        regrid(el, 3)
    with pytest.raises(ReshardError, match="--elastic .* needs --resume auto"):
        regrid(TrainConfig(elastic=True), 2)


def test_the_run_history_says_what_the_batchnorm_statistics_did() -> None:
    grow = describe((2, 2), ["2"], (1, 4), [], has_buffers=True)
    assert grow == {"from": "2x2", "to": "1x4", "split_was": ["2"], "split": [],
                    "batchnorm": "BatchNorm statistics: replicas 2..3 start from replica 0's"}
    shrink = describe((2, 2), ["2"], (2, 1), ["2"], has_buffers=True)
    assert shrink["batchnorm"] == ("BatchNorm statistics: replica 0 keep their own, replica 1's "
                                   "are dropped")
    assert "batchnorm" not in describe((2, 2), ["2"], (1, 4), [], has_buffers=False)
    with pytest.raises(ValueError, match="--elastic continues a run .* needs --resume auto"):
        TrainConfig(elastic=True).validate()


def test_a_stage_of_a_new_grid_reads_only_the_shards_holding_its_tensors(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)             # 2x2, split before module 2
    saved = read_whole(ckpt)
    m = read_manifest(ckpt)
    stage0, stage1 = (_cut(TrainConfig(stages=2, replicas=1, batch_size=8))[0][k]["module"] for k in (0, 1))
    whole_model = _cut(TrainConfig(stages=1, replicas=1, batch_size=8))[0][0]["module"]
    need0, need1 = stage0.state_dict().keys(), stage1.state_dict().keys()
    assert (shards_holding(m, need0), shards_holding(m, need1)) == ([0], [1])
    assert shards_holding(m, whole_model.state_dict().keys()) == [0, 1] == shards_holding(m, None)
    assert shards_holding(m, []) == [1]      # nothing of its own: one shard, for the position
    # stage 1's shard damaged: stage 0 of the new grid never reads it, and gets the saved values
    shard1 = ckpt / "stage1.pt"
    data = bytearray(shard1.read_bytes())
    data[-1] ^= 0xFF
    shard1.write_bytes(bytes(data))
    part = read_whole(ckpt, need=need0)
    state, buffers = stage_state(part, stage0, 0, "checkpoint")
    _same(state["model"], {k: saved.model[k] for k in need0}, "stage 0's model")
    _same(buffers, {k: v for k, v in saved.replica_buffers[0].items() if k in need0}, "replica 0's buffers")
    assert state["optimizer"]["state"] and part.position == saved.position and part.hyper == saved.hyper
    for need in (need1, None):               # whoever needs it finds the damage, naming the file
        with pytest.raises(CheckpointError, match=r"stage1\.pt' is corrupt"):
            read_whole(ckpt, need=need)
    # a manifest that lists no tensors (an older dpsgs's): every shard is read
    for row in m["shards"]:
        del row["tensors"]
    (ckpt / "manifest.json").write_text(json.dumps(m))
    assert shards_holding(m, need0) == [0, 1]
    with pytest.raises(CheckpointError, match=r"stage1\.pt' is corrupt"):
        read_whole(ckpt, need=need0)
