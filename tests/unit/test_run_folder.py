"""RunFolder: a broken run.json is refused naming the file (issue 20, item 6); run.json and
summary.json are strict JSON even when a figure is NaN (item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpsgs.config import TrainConfig
from dpsgs.job.run_folder import RunFolder, RunFolderError


@pytest.mark.parametrize("text, why", [
    ('{"run_id": "abc", "identity": {', "cannot be read as a run record (JSONDecodeError: "),
    ('{"identity": {}, "history": []}', "is not a run record (it needs a run_id, an identity and a history"),
    ('[1, 2]', "is not a run record"),
    ('{"run_id": "abc", "identity": [], "history": []}', "is not a run record"),
])
def test_a_broken_run_json_is_refused_naming_the_file(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(RunFolderError) as e:
        RunFolder.open(TrainConfig(run_dir=str(tmp_path), resume="auto"))
    assert str(e.value).startswith(f"{tmp_path / 'run.json'} ") and why in str(e.value)
    assert "\n" not in str(e.value)
    RunFolder.open(TrainConfig(run_dir=str(tmp_path / "other"))).close()   # the lock was released


def test_nan_figures_are_written_as_null(tmp_path: Path) -> None:
    folder = RunFolder.open(TrainConfig(run_dir=str(tmp_path)))
    folder.start(TrainConfig(run_dir=str(tmp_path)), None)
    summary = {"test_loss": float("nan"), "test_accuracy": 0.5, "test_loss_nonfinite": 2,
               "losses": [1.0, float("inf")]}
    folder.write_summary(summary)
    folder.finish(summary)
    folder.close()

    def strict(name: str) -> dict:
        return json.loads((tmp_path / name).read_text(),
                          parse_constant=lambda c: pytest.fail(f"{name} holds a bare {c}"))

    assert strict("summary.json") == {"test_loss": None, "test_accuracy": 0.5,
                                      "test_loss_nonfinite": 2, "losses": [1.0, None]}
    final = strict("run.json")["final"]
    assert final["test_loss"] is None and final["test_loss_nonfinite"] == 2
