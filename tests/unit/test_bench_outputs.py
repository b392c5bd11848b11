"""Benchmark outputs: new run-specific names by default, never a write over another run's
file; train and tta refuse an --out holding their files (exit 2) unless --force."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpsgs.bench import comm, train, tta
from dpsgs.bench.harness import write_json
from dpsgs.bench.outputs import claim_dir, existing_error, free_names, out_folder, write_new

__all__: list[str] = []


def test_free_names_and_claim_dir(tmp_path: Path) -> None:
    names = free_names(tmp_path / "comm.json")
    assert [next(names).name for _ in range(3)] == ["comm.json", "comm-2.json", "comm-3.json"]
    first, second = claim_dir(tmp_path / "a" / "train-x"), claim_dir(tmp_path / "a" / "train-x")
    assert (first.name, second.name) == ("train-x", "train-x-2")     # same second, two folders
    assert first.is_dir() and second.is_dir()


def test_write_new_never_replaces_a_file(tmp_path: Path) -> None:
    taken = tmp_path / "r.json"
    taken.write_text("another run")
    assert write_new(taken, "mine") == tmp_path / "r-2.json"
    assert taken.read_text() == "another run" and (tmp_path / "r-2.json").read_text() == "mine"
    assert write_json(taken, {"a": 1}, overwrite=False) == tmp_path / "r-3.json"
    assert write_json(taken, {"a": 2}) == taken and json.loads(taken.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-2.json", "r-3.json", "r.json"]


def test_existing_error_is_one_line_naming_the_file(tmp_path: Path) -> None:
    free, taken = tmp_path / "new.json", tmp_path / "old.json"
    taken.write_text("{}")
    assert existing_error("prog", [free], force=False) is None
    assert existing_error("prog", [free, taken], force=True) is None
    assert existing_error("prog", [free, taken], force=False) == (
        f"prog: {taken} already exists (another run's results); pass another --out, "
        "or --force to overwrite it")


def test_comm_default_is_run_specific(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert comm.default_out(4, "20250102-030405") == Path("runs/bench/comm-4ranks-"
                                                          "20250102-030405.json")
    out, refused = comm.resolve_out(None, False, 2)
    assert refused is None and re.fullmatch(r"runs/bench/comm-2ranks-\d{8}-\d{6}\.json", out)
    assert comm.resolve_out("-", False, 2) == (None, None)
    (tmp_path / "mine.json").write_text("{}")
    assert comm.resolve_out("mine.json", True, 2) == ("mine.json", None)
    out, refused = comm.resolve_out("mine.json", False, 2)
    assert out == "mine.json" and refused.startswith("dpsgs.bench.comm: mine.json already")
    folder = out_folder(None, "train")
    assert folder.is_dir() and re.fullmatch(r"runs/bench/train-\d{8}-\d{6}", str(folder))


def _refused(capsys: pytest.CaptureFixture, path: Path, before: bytes) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{path} already exists" in lines[0] and "--force" in lines[0]
    assert path.read_bytes() == before


def test_train_and_tta_refuse_an_out_with_their_files(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    # refused before any run: running anything here fails the test
    monkeypatch.setattr(train, "run_workload", lambda *a: pytest.fail("train ran"))
    monkeypatch.setattr(tta, "_run", lambda *a: pytest.fail("tta ran"))
    old = tmp_path / "train-mlp.json"
    old.write_text('{"published": true}')
    assert train.main(["--workload", "mlp", "--out", str(tmp_path), "--no-plot"]) == 2
    _refused(capsys, old, b'{"published": true}')
    png = tmp_path / "train-cnn-split.png"                 # a plot counts too
    png.write_bytes(b"png")
    assert train.main(["--workload", "cnn", "--out", str(tmp_path)]) == 2
    _refused(capsys, png, b"png")
    old = tmp_path / "tta-digits-mlp.json"
    old.write_text("{}")
    assert tta.main(["--dataset", "digits", "--out", str(tmp_path)]) == 2
    _refused(capsys, old, b"{}")


def test_train_force_overwrites_and_default_is_a_new_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "run_workload", lambda *a: {"fake": len(a)})
    monkeypatch.setattr(train, "_table", lambda doc: "table")
    old = tmp_path / "train-mlp.json"
    old.write_text("{}")
    assert train.main(["--workload", "mlp", "--out", str(tmp_path), "--no-plot",
                       "--force"]) == 0
    assert json.loads(old.read_text()) == {"fake": 8}
    monkeypatch.chdir(tmp_path)
    assert train.main(["--workload", "mlp", "--no-plot"]) == 0
    (folder,) = (tmp_path / "runs" / "bench").iterdir()
    assert re.fullmatch(r"train-\d{8}-\d{6}", folder.name)
    assert [p.name for p in folder.iterdir()] == ["train-mlp.json"]
