"""Checkpoint files in one process (1x1 grid, comm=None): round trip, what `latest` picks, and
the messages for an incomplete, truncated, corrupt or mismatched checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsgs.job.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint,
                              prune_checkpoints, read_manifest, resolve_resume, save_checkpoint)


@dataclass
class G:   # the two attributes and the method of topology.Grid that checkpoints use
    stages: int
    replicas: int

    def coords(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.stages)


ONE = G(1, 1)


def state(v: float) -> dict:
    model = torch.nn.Linear(3, 2).double()
    torch.nn.init.constant_(model.weight, v)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": int(v),
            "rng": torch.get_rng_state()}


def save(run: Path, tag: str, v: float, model: str = "mlp", run_id: str | None = None) -> Path:
    meta = {"model": model, "step": int(v), **({"run_id": run_id} if run_id else {})}
    return save_checkpoint(run, tag, ONE, 0, state(v), meta, None)


def test_round_trip_bit_exact(tmp_path: Path) -> None:
    folder = save(tmp_path, "step3", 3.0)
    assert folder == tmp_path / "checkpoints" / "step3"
    got = load_checkpoint(folder, ONE, 0, {"model": "mlp"})
    want = state(3.0)
    assert torch.equal(got["model"]["weight"], want["model"]["weight"])
    assert got["model"]["weight"].dtype == torch.float64
    assert torch.equal(got["optimizer"]["state"][0]["momentum_buffer"],
                       want["optimizer"]["state"][0]["momentum_buffer"])
    assert got["step"] == 3
    m = read_manifest(folder)
    assert (m["stages"], m["replicas"], m["meta"]) == (1, 1, {"model": "mlp", "step": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "stage0.pt"]


def test_latest_skips_uncommitted_but_never_a_damaged_committed_one(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    save(tmp_path, "b", 2.0)
    save(tmp_path, "a", 5.0)                      # newer by commit even though its name sorts first
    save(tmp_path, "c", 9.0)
    (tmp_path / "checkpoints" / "c" / "manifest.json").unlink()        # interrupted save
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "a"
    (tmp_path / "checkpoints" / "a" / "stage0.pt").write_bytes(b"short")  # truncated shard
    with pytest.raises(CheckpointError, match=r"checkpoint .*/a cannot be resumed: shard .*/a/stage0.pt "
                                              r"is truncated or overwritten: 5 bytes.*--resume-fallback"):
        latest_checkpoint(tmp_path)
    notes: list[str] = []
    assert latest_checkpoint(tmp_path, fallback=True, note=notes.append) == tmp_path / "checkpoints" / "b"
    assert len(notes) == 1 and "checkpoints/a cannot be resumed" in notes[0] and "skipped" in notes[0]
    assert resolve_resume("auto", tmp_path, fallback=True, note=notes.append) == tmp_path / "checkpoints" / "b"
    assert resolve_resume(str(tmp_path), None, fallback=True, note=notes.append) == tmp_path / "checkpoints" / "b"
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        resolve_resume(str(tmp_path / "checkpoints" / "a"), None)
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path / "fresh") is None          # nothing yet: start anew
    with pytest.raises(CheckpointError, match="--resume auto needs --run-dir"):
        resolve_resume("auto", None)


def test_every_damage_is_named_and_all_damaged_is_an_error(tmp_path: Path) -> None:
    save(tmp_path, "e0", 1.0)
    save(tmp_path, "e1", 2.0)
    (tmp_path / "checkpoints" / "e1" / "stage0.pt").unlink()                  # deleted shard
    with pytest.raises(CheckpointError, match=r"e1 cannot be resumed: shard .*stage0.pt is missing"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "e0" / "manifest.json").write_text("{ torn")  # corrupt manifest
    with pytest.raises(CheckpointError, match=r"no checkpoint can be resumed: (?=.*e1.*missing)(?=.*e0.*corrupt)"):
        latest_checkpoint(tmp_path, fallback=True)


def test_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    save(tmp_path, "x", 1.0, run_id="run-A")
    assert latest_checkpoint(tmp_path, run_id="run-A") == tmp_path / "checkpoints" / "x"
    with pytest.raises(CheckpointError, match="belongs to run run-A, not to this folder's run run-B"):
        latest_checkpoint(tmp_path, run_id="run-B")


def test_resaving_a_tag_uncommits_it_first(tmp_path: Path) -> None:
    save(tmp_path, "final", 1.0)
    save(tmp_path, "final", 4.0)
    assert load_checkpoint(tmp_path / "checkpoints" / "final", ONE, 0)["step"] == 4


def test_incomplete_checkpoint_message(tmp_path: Path) -> None:
    folder = save(tmp_path, "s", 1.0)
    (folder / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"'.*/s' is incomplete: no manifest.json"):
        load_checkpoint(folder, ONE, 0)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", ONE, 0)


def test_truncated_and_corrupt_shards_name_the_file(tmp_path: Path) -> None:
    folder = save(tmp_path, "s", 1.0)
    shard = folder / "stage0.pt"
    blob = shard.read_bytes()
    shard.write_bytes(blob[:100])
    with pytest.raises(CheckpointError, match=r"shard '.*/s/stage0.pt' is truncated.*100 bytes"):
        load_checkpoint(folder, ONE, 0)
    shard.write_bytes(blob[:-10] + b"X" * 10)
    with pytest.raises(CheckpointError, match=r"shard '.*stage0.pt' is corrupt: its SHA-256"):
        load_checkpoint(folder, ONE, 0)
    # a shard whose checksum matches but is not a torch file: torch.load's error is wrapped
    man = json.loads((folder / "manifest.json").read_text())
    shard.write_bytes(b"not a zip file at all")
    import hashlib
    man["shards"][0].update(bytes=21, sha256=hashlib.sha256(b"not a zip file at all").hexdigest())
    (folder / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=r"shard '.*stage0.pt' cannot be loaded"):
        load_checkpoint(folder, ONE, 0)
    (folder / "manifest.json").write_text("{ torn")
    with pytest.raises(CheckpointError, match=r"manifest '.*manifest.json' is corrupt"):
        load_checkpoint(folder, ONE, 0)


def test_mismatched_grid_and_model_name_both(tmp_path: Path) -> None:
    folder = save(tmp_path, "s", 1.0, model="resnet20")
    with pytest.raises(CheckpointError,
                       match=r"written by a 1x1 grid \(K=1 stages x N=1 replicas\); "
                             r"this run is 2x2"):
        load_checkpoint(folder, G(2, 2), 0)
    with pytest.raises(CheckpointError,
                       match=r"saved with model='resnet20', this run has model='resnet56'"):
        load_checkpoint(folder, ONE, 0, {"model": "resnet56"})


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tag '../x'"):
        save_checkpoint(tmp_path, "../x", ONE, 0, {}, {}, None)
    with pytest.raises(ValueError, match="comm=None only for a 1x1 grid, got 2x1"):
        save_checkpoint(tmp_path, "x", G(2, 1), 0, {}, {}, None)
    # refused at save time, not at resume time; reported on every rank
    with pytest.raises(CheckpointError, match=r"stage_state\['rng'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path, "x", ONE, 0, {"rng": np.zeros(3)}, {}, None)
    assert latest_checkpoint(tmp_path) is None


def test_keep_prunes_older_complete_checkpoints(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, f"s{step}", ONE, 0, state(step), {"step": step}, None, keep=2)
    (tmp_path / "checkpoints" / "junk").mkdir()               # incomplete: left alone
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["junk", "s2", "s3"]
    assert prune_checkpoints(tmp_path, 1) == [tmp_path / "checkpoints" / "s2"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "s3"
    with pytest.raises(ValueError, match="keep must be >= 1"):
        save_checkpoint(tmp_path, "s4", ONE, 0, {}, {}, None, keep=0)
