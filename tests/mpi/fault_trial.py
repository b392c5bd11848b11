"""One fault-injection trial: launch `python -m dpsgs train` on K x N ranks with DPSGS_FAULT
set, and measure how the job ends (exit code, time from the fault to the exit, which message
names the dead rank or the operation). Used by tests/mpi/test_faults.py (a few trials) and
scripts/fault-matrix.sh (the full matrix):

    python tests/mpi/fault_trial.py --trials 24 --seed 1 --json runs/fault-matrix/seed1.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from dpsgs.reliability.rank_map import parse_rank_map  # noqa: E402
from launcher import COLD, rank_pythonpath  # noqa: E402

__all__ = ["Trial", "Outcome", "run_trial", "random_trials", "train_args", "TOPOLOGIES"]

TOPOLOGIES = ((2, 1), (2, 2), (3, 1))
PHASES = ("warmup", "forward", "backward", "reduce", "flush", "eval", "save")
TIMEOUT = 4.0            # --timeout of the trainer in trials: survivors give up after this
SLACK = 10.0             # the acceptance bound is TIMEOUT + SLACK from the fault to the exit
STARTUP_BUDGET = 90.0    # imports of torch on 4 ranks sharing 2 cores, plus the run itself


@dataclass
class Trial:
    stages: int
    replicas: int
    rank: int
    step: int
    phase: str
    kind: str = "sigkill"
    launcher: str = "cleanup"   # cleanup: hydra's default; survivors: -disable-auto-cleanup

    @property
    def topology(self) -> str:
        return f"{self.stages}x{self.replicas}"

    @property
    def spec(self) -> str:
        return f"rank={self.rank},step={self.step},phase={self.phase},kind={self.kind}"


@dataclass
class Outcome:
    trial: Trial
    returncode: int | None
    seconds: float              # whole mpirun, start-up included
    fired: bool                 # the fault line was printed (the trial really tested a death)
    time_to_exit: float | None  # from the fault to mpirun's exit
    hang: bool
    named_by: str               # what named the dead rank or the operation ("" = nothing)
    message: str                # that line
    output_tail: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return (not self.hang and self.fired and self.returncode not in (0, None)
                and self.time_to_exit is not None and self.time_to_exit <= TIMEOUT + SLACK
                and bool(self.named_by))


def train_args(stages: int, replicas: int, run_dir: str, timeout: float = TIMEOUT,
               epochs: int = 3) -> list[str]:
    """A tiny run: 8 steps per epoch on synthetic data, a flush, eval and save every epoch."""
    return ["train", "--stages", str(stages), "--replicas", str(replicas),
            "--model", "mlp", "--dataset", "synthetic", "--synthetic-shape", "16",
            "--synthetic-samples", str(64 * replicas), "--batch-size", "8",
            "--epochs", str(epochs), "--lr-schedule", "constant",
            "--balance", "params",          # deterministic split (time-profiled ones vary)
            "--timeout", str(timeout), "--warn-after", "2",
            "--run-dir", run_dir, "--checkpoint-every", "1", "--no-progress"]


_FAULT_LINE = re.compile(r"injected fault on rank (\d+).*wall (\d+\.\d+)")
_HYDRA_PID = re.compile(r"BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES\s*\n=\s*PID (\d+)")
# survivors' own reports: CommTimeout from the C++ core, VoteTimeout from dpsgs.reliability.votes
_TIMEOUT_LINE = re.compile(
    r"^.*(timed out|did not complete within|not reached by every rank|CommTimeout|VoteTimeout)"
    r".*$", re.M)
_RANK_ERROR = re.compile(r"^.*(FaultInjected|MemoryError).*$", re.M)


def _named(trial: Trial, text: str) -> tuple[str, str]:
    for m in _TIMEOUT_LINE.finditer(text):
        line = m.group(0).strip()
        if re.search(r"\b(rank|peer)s?\b", line):
            return "survivor timeout", line[:300]
    m = _HYDRA_PID.search(text)
    if m:
        pid = int(m.group(1))
        rank = parse_rank_map(text).get(pid)
        if rank == trial.rank:
            return "hydra PID + rank map", f"PID {pid} = rank {rank} (BAD TERMINATION)"
    m = _RANK_ERROR.search(text)
    if m and trial.kind in ("exception", "oom"):
        return "failing rank's error", m.group(0).strip()[:300]
    return "", ""


def run_trial(trial: Trial, timeout: float = TIMEOUT, epochs: int = 3,
              extra_env: dict[str, str] | None = None) -> Outcome:
    py = sys.executable
    mpirun = str(Path(py).parent / "mpirun")
    flags = ["-disable-auto-cleanup"] if trial.launcher == "survivors" else []
    with tempfile.TemporaryDirectory(prefix="dpsgs-fault-") as run_dir:
        cmd = [mpirun, "-n", str(trial.stages * trial.replicas), *flags, py, "-m", "dpsgs",
               *train_args(trial.stages, trial.replicas, run_dir, timeout, epochs)]
        # cold ranks: hydra names a dead rank by its PID, which a warm rank's client does not share
        env = dict(os.environ, DPSGS_FAULT=trial.spec, OMP_NUM_THREADS="1",
                   PYTHONPATH=rank_pythonpath(), **COLD)
        env.update(extra_env or {})
        start = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO,
                               timeout=STARTUP_BUDGET + timeout + SLACK,
                               stdin=subprocess.DEVNULL)
            rc, out, hang = p.returncode, p.stdout + p.stderr, False
        except subprocess.TimeoutExpired as e:
            rc, hang = None, True
            out = "".join(x.decode() if isinstance(x, bytes) else (x or "")
                          for x in (e.stdout, e.stderr))
        end_wall, seconds = time.time(), time.monotonic() - start
    m = _FAULT_LINE.search(out)
    time_to_exit = (end_wall - float(m.group(2))) if m else None
    named_by, message = _named(trial, out)
    return Outcome(trial, rc, round(seconds, 2), m is not None,
                   None if time_to_exit is None else round(time_to_exit, 2), hang,
                   named_by, message, out[-3000:])


def random_trials(count: int, seed: int, kinds: tuple[str, ...] = ("sigkill", "exit", "hang",
                                                                   "exception"),
                  steps_per_epoch: int = 8, epochs: int = 3) -> list[Trial]:
    """Seeded: random topology, rank, phase, step and kind; the launcher follows the kind
    (hang and exit test the survivors' own deadline: -disable-auto-cleanup)."""
    rng = random.Random(seed)
    trials = []
    for i in range(count):
        k, n = TOPOLOGIES[i % len(TOPOLOGIES)]      # every topology equally often
        phase = PHASES[rng.randrange(len(PHASES))]
        kind = kinds[rng.randrange(len(kinds))]
        # steps before the last epoch, so that every phase (eval/save/flush happen at epoch
        # ends, warm-up at epoch starts) still occurs at or after the chosen step
        step = rng.randrange(0, steps_per_epoch * (epochs - 1))
        launcher = "survivors" if kind in ("hang", "exit") else "cleanup"
        trials.append(Trial(k, n, rng.randrange(k * n), step, phase, kind, launcher))
    return trials


def table(outcomes: list[Outcome]) -> str:
    head = (f"{'#':>3} {'topo':>4} {'rank':>4} {'step':>4} {'phase':>8} {'kind':>9} "
            f"{'launcher':>9} {'rc':>4} {'exit_s':>6} {'total_s':>7} {'ok':>3}  named by: message")
    rows = [head, "-" * len(head)]
    for i, o in enumerate(outcomes):
        t = o.trial
        tte = "-" if o.time_to_exit is None else f"{o.time_to_exit:.1f}"
        rc = "HANG" if o.hang else str(o.returncode)
        rows.append(f"{i:>3} {t.topology:>4} {t.rank:>4} {t.step:>4} {t.phase:>8} {t.kind:>9} "
                    f"{t.launcher:>9} {rc:>4} {tte:>6} {o.seconds:>7.1f} "
                    f"{'yes' if o.ok else 'NO':>3}  {o.named_by or 'NOTHING'}: "
                    f"{o.message[:110]}")
    ok = sum(o.ok for o in outcomes)
    hangs = sum(o.hang for o in outcomes)
    ttes = [o.time_to_exit for o in outcomes if o.time_to_exit is not None]
    worst = max(ttes) if ttes else float("nan")
    rows.append(f"# {ok}/{len(outcomes)} trials ok, {hangs} hangs, worst time to exit "
                f"{worst:.1f} s (bound: timeout {TIMEOUT:.0f} s + {SLACK:.0f} s)")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every outcome here")
    args = ap.parse_args()
    outcomes = []
    for i, t in enumerate(random_trials(args.trials, args.seed)):
        o = run_trial(t)
        outcomes.append(o)
        print(f"trial {i}: {t.topology} {t.spec} {t.launcher}: rc={o.returncode} "
              f"exit {o.time_to_exit} s, {'ok' if o.ok else 'NOT OK'}", file=sys.stderr,
              flush=True)
    print(table(outcomes))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "seed": args.seed, "timeout": TIMEOUT, "bound": TIMEOUT + SLACK,
            "trials": [dict(asdict(o.trial), topology=o.trial.topology,
                            **{k: v for k, v in asdict(o).items()
                               if k not in ("trial", "output_tail")}, ok=o.ok,
                            **({} if o.ok else {"output_tail": o.output_tail}))
                       for o in outcomes]}, indent=1) + "\n")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
