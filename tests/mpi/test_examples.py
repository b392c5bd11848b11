"""The shipped examples run: the embedding workflow on 3 ranks (2 train, 1 works), and the
SLURM script at least parses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launcher import REPO, run_ranks  # noqa: E402


def test_embed_subcomm_trains_on_a_subset(tmp_path: Path) -> None:
    run = run_ranks(3, REPO / "examples" / "embed_subcomm.py", "--epochs", "1",
                    "--run-dir", str(tmp_path / "run"), timeout=180)
    lines = sorted(l for l in run.stdout.splitlines() if l.startswith("world rank"))
    assert [l.split(":")[1].split(";")[0].strip() for l in lines] == \
        ["trained", "trained", "worked"], run.tail()
    # every rank reports the same accuracy (broadcast after the meeting) and a sane pi
    accs = {l.split("test accuracy ")[1].split(",")[0] for l in lines}
    assert len(accs) == 1 and 0.3 < float(accs.pop()) <= 1.0
    assert all(abs(float(l.rsplit("~ ", 1)[1]) - 3.1416) < 0.05 for l in lines)
    assert (tmp_path / "run" / "summary.json").is_file()


def test_slurm_script_parses() -> None:
    script = REPO / "examples" / "slurm_train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --signal=USR1@120" in text and "--resume auto" in text
