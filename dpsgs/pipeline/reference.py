"""Single-process reference: the K x N grid in one process, one thread per virtual rank.

Every virtual rank runs the very StageExecutor the distributed trainer runs, over a
LoopbackTransport (in-process queues and an in-process mean over the replicas), so the
reference and the trainer share one step contract: tests hold the distributed run against it
step for step (transport against transport), and the schedule's arithmetic is checked apart,
against closed forms and a hand-written formulation (tests/unit/test_reference.py). Users
run it to study staleness without MPI: `python -m dpsgs train --simulate ...`.

After `run()`: `losses[(global batch, replica)] = (loss, correct, count)` from the last
stages; `staleness = [(stage, global batch, apply step - forward step)]`; `history`, per plan
step, the mean loss/accuracy of the batches finished; `executors[replica][stage]`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from dpsgs.comm.loopback import LoopbackGroup, PeerFailed
from dpsgs.pipeline.executor import StageExecutor
from dpsgs.pipeline.hooks import HookChain, StepHooks
from dpsgs.pipeline.recorder import Recorder, observed_staleness
from dpsgs.pipeline.schedule import fdg_plan
from dpsgs.pipeline.workload import Workload

__all__ = ["Reference"]

Segment = list[tuple[int, int]]


class Reference:
    """K x N virtual ranks of `workload`; `run(segments)` trains and returns the summary."""

    def __init__(self, workload: Workload, progress: StepHooks | None = None,
                 device: torch.device | str = "cpu") -> None:
        cfg = workload.config
        if cfg.schedule not in ("fdg", "sync"):
            raise ValueError(f"schedule must be fdg or sync, got {cfg.schedule!r}")
        self.workload, self.config = workload, cfg
        K, N = cfg.stages, cfg.replicas
        self.group = LoopbackGroup(K, N, timeout=cfg.timeout, device=device)
        self.recorder = Recorder()
        # `progress` (e.g. a bar) hears replica 0's last stage: one step_done per plan step
        self.executors = [[StageExecutor(workload, r * K + k, self.group.transport(r * K + k),
                                         hooks=HookChain(self.recorder.for_replica(r),
                                                         progress if (r, k) == (0, K - 1) else None))
                           for k in range(K)] for r in range(N)]
        self.history: list[dict[str, Any]] = []
        self.step = 0          # plan steps run (over all segments)
        self.iterations = 0    # global batches applied

    @property
    def losses(self) -> dict[tuple[int, int], tuple[float, int]]:
        return {key: (loss, correct) for key, (loss, correct, _) in self.recorder.losses.items()}

    @property
    def staleness(self) -> list[tuple[int, int, int]]:
        return self.recorder.staleness

    def _run_rank(self, ex: StageExecutor, segments: list[Segment], out: dict[str, Any]) -> None:
        try:
            step = 0
            for seg in segments:
                seg = list(seg)
                if self.config.schedule == "fdg":
                    plan = fdg_plan(ex.K, len(seg), self.config.overlap)
                    ex.run_fdg(plan, seg, step)
                    step += len(plan)
                else:
                    ex.run_sync(seg, step)
                    step += len(seg)
            out["steps"] = step
            out["eval"] = ex.evaluate()
        except BaseException as e:  # noqa: BLE001 - re-raised by run() after every thread ended
            out["error"] = e
            self.group.fail(e)

    def run(self, segments: list[Segment] | None = None) -> dict[str, Any]:
        """Train over `segments` (each flushed; default: the workload's), then evaluate; the
        summary dict."""
        segments = self.workload.segments() if segments is None else segments
        t0 = time.perf_counter()
        results = [[{} for _ in row] for row in self.executors]
        threads = [threading.Thread(target=self._run_rank, args=(ex, segments, results[r][k]),
                                    name=f"dpsgs-reference-r{r}s{k}", daemon=True)
                   for r, row in enumerate(self.executors) for k, ex in enumerate(row)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        errors = [res["error"] for row in results for res in row if "error" in res]
        if errors:   # the first real failure, not the PeerFailed it caused elsewhere
            raise next((e for e in errors if not isinstance(e, PeerFailed)), errors[0])
        seconds = time.perf_counter() - t0
        self.step = results[0][0]["steps"]
        self.iterations = sum(len(s) for s in segments)
        self._history()
        loss_sum = sum(res["eval"][0] for row in results for res in row)
        correct = sum(res["eval"][1] for row in results for res in row)
        n = max(1, sum(res["eval"][2] for row in results for res in row))
        cfg = self.config
        samples = self.iterations * cfg.batch_size * cfg.replicas
        first = self.executors[0]
        return {
            "mode": "simulate", "schedule": cfg.schedule, "stages": cfg.stages,
            "replicas": cfg.replicas, "steps": self.step, "iterations": self.iterations,
            "seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0,
            "final_train_loss": next((h["loss"] for h in reversed(self.history) if "loss" in h), None),
            "staleness": observed_staleness(self.staleness),
            "stash_peak_bytes": [ex.compute.peak_stash_bytes for ex in first],
            "stage_params": [sum(p.numel() for p in ex.compute.params) for ex in first],
            "test_loss": loss_sum / n, "test_accuracy": correct / n,
        }

    def _history(self) -> None:
        """Per plan step, the mean loss and accuracy of the batches finished (all replicas)."""
        self.history = []
        for step in range(self.step):
            rec: dict[str, Any] = {"step": step}
            done = self.recorder.step_losses.get(step)
            if done:
                rec["loss"] = sum(v[0] for v in done) / len(done)
                rec["accuracy"] = sum(v[1] for v in done) / sum(v[2] for v in done)
            self.history.append(rec)

    def parameters(self, replica: int = 0) -> list[list[torch.Tensor]]:
        """Per stage, the parameters of `replica` (detached)."""
        return [[p.detach() for p in ex.compute.params] for ex in self.executors[replica]]
