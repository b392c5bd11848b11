"""Single-process reference: the fdg/sync schedules for K x N virtual ranks in one process.

It runs the same plan (dpsgs.pipeline.schedule), the same StageCompute, sampler, optimizer and LR
code as the distributed trainer, with the all-reduce replaced by an in-process mean over
the replicas; tests hold the distributed run against it step for step. Users can run it
to study staleness without MPI: `python -m dpsgs train --simulate ...`.

Recorded (attributes of `Reference` after `run()`):
- losses: {(global batch, replica): (loss, correct)} as computed by the last stage;
- staleness: [(stage, global batch, apply step - forward step)] for every applied update,
  i.e. steps between the forward of a batch through a stage and the update applying its
  gradient there (2(K-1-k), +1 with overlap=step);
- history: per step of the plan, the mean loss/accuracy of the batches finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpsgs.job.run_setup import Setup, eval_batches, prepare, segments
from dpsgs.job.optim import build_optimizer, lr_at, set_lr
from dpsgs.pipeline.schedule import fdg_plan, sync_plan
from dpsgs.pipeline.stage import StageCompute

__all__ = ["Reference", "simulate", "mean_grads", "evaluate_model", "observed_staleness"]


@dataclass
class _Unit:
    """One virtual rank: a stage of a replica."""
    compute: StageCompute
    optimizer: torch.optim.Optimizer | None     # None: a stage without parameters


def mean_grads(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Mean over replicas, summed in replica order then divided by N (what the reducer's
    averaging all-reduce computes; exact for N <= 2)."""
    out = []
    for per_param in zip(*grads):
        acc = per_param[0].clone()
        for g in per_param[1:]:
            acc += g
        out.append(acc / len(per_param) if len(per_param) > 1 else acc)
    return out


@torch.no_grad()
def evaluate_model(stage_modules: list[nn.Module], x: torch.Tensor,
                   y: torch.Tensor) -> tuple[float, int]:
    """(sum of losses, correct) of a batch through a replica's stages in eval mode."""
    modes = [m.training for m in stage_modules]
    for m in stage_modules:
        m.eval()
    try:
        for m in stage_modules:
            x = m(x)
    finally:
        for m, mode in zip(stage_modules, modes):
            m.train(mode)
    loss = torch.nn.functional.cross_entropy(x, y, reduction="sum")
    return float(loss), int((x.argmax(dim=1) == y).sum())


class Reference:
    """K x N virtual ranks; `run()` trains per the config and returns the summary."""

    def __init__(self, config: Any, model: nn.Sequential | None = None,
                 data: tuple[Any, Any] | None = None, setup: Setup | None = None) -> None:
        if config.schedule not in ("fdg", "sync"):
            raise ValueError(f"schedule must be fdg or sync, got {config.schedule!r}")
        if config.schedule == "sync" and config.batch_size % config.micro_batches:
            raise ValueError(f"sync schedule: batch_size {config.batch_size} is not divisible "
                             f"by micro_batches {config.micro_batches}")
        self.config = config
        self.setup = setup or prepare(config, model, data)
        K, N = config.stages, config.replicas
        shrink = config.shrink if config.schedule == "fdg" else 1.0
        self.units: list[list[_Unit]] = []
        for r in range(N):
            replica_model = self.setup.model if N == 1 else _clone(self.setup.model)
            row = []
            for k in range(K):
                module = self.setup.stage_layers(replica_model, k)
                compute = StageCompute(module, k, K, config.stash, shrink)
                row.append(_Unit(compute, build_optimizer(compute.params, config)))
            self.units.append(row)
        self.losses: dict[tuple[int, int], tuple[float, int]] = {}
        self.staleness: list[tuple[int, int, int]] = []
        self.history: list[dict[str, Any]] = []
        self.step = 0          # plan steps run so far (over all segments)
        self.iterations = 0    # global batches applied

    # -- helpers -------------------------------------------------------------------------
    def _global(self, eb: tuple[int, int]) -> int:
        return eb[0] * self.setup.batches_per_epoch + eb[1]

    def _apply(self, k: int, g: int, mean: list[torch.Tensor]) -> None:
        lr = lr_at(g, self.setup.total_iterations, self.config, self.setup.batches_per_epoch)
        for row in self.units:
            u = row[k]
            for p, m in zip(u.compute.params, mean):
                p.grad = m.clone()
            if u.optimizer is not None:
                set_lr(u.optimizer, lr)
                u.optimizer.step()

    def _backward_all(self, k: int) -> list[torch.Tensor]:
        return mean_grads([[p.grad for p in row[k].compute.params] for row in self.units])

    # -- fdg -----------------------------------------------------------------------------
    def _fdg_segment(self, seg: list[tuple[int, int]]) -> None:
        K, N = self.config.stages, self.config.replicas
        overlap = self.config.overlap
        acts: dict[tuple[int, int], torch.Tensor] = {}    # (r, k) -> sent last step
        grads: dict[tuple[int, int], torch.Tensor] = {}
        fwd_at: dict[tuple[int, int], int] = {}           # (k, plan batch) -> step
        pending: dict[int, tuple[int, list[torch.Tensor]]] = {}
        for row in fdg_plan(K, len(seg), overlap):
            t = row[0].step
            new_acts, new_grads = {}, {}
            losses = []
            for k, s in enumerate(row):
                last = k == K - 1
                if overlap == "step" and s.apply is not None:
                    j, mean = pending.pop(k)
                    assert j == s.apply
                    self._apply(k, self._global(seg[j]), mean)
                    self.staleness.append((k, self._global(seg[j]), t - fwd_at[(k, j)]))
                if last and s.forward is not None:
                    for r in range(N):
                        x = self._input(seg[s.forward], r) if k == 0 else acts[(r, k - 1)]
                        self.units[r][k].compute.forward(s.forward, x, live=True)
                    fwd_at[(k, s.forward)] = t
                if s.backward is not None:
                    for r in range(N):
                        c = self.units[r][k].compute
                        for p in c.params:
                            p.grad = None
                        if last:
                            y = self.setup.labels(*seg[s.backward], r)
                            loss, correct = c.loss(s.backward, y)
                            self.losses[(self._global(seg[s.backward]), r)] = (loss, correct)
                            losses.append((loss, correct, len(y)))
                            gi = c.backward(s.backward)
                        else:
                            gi = c.backward(s.backward, grads[(r, k + 1)])
                        if k > 0:
                            new_grads[(r, k)] = gi
                    mean = self._backward_all(k)
                    if overlap == "backward":
                        self._apply(k, self._global(seg[s.backward]), mean)
                        self.staleness.append((k, self._global(seg[s.backward]),
                                               t - fwd_at[(k, s.backward)]))
                    else:
                        pending[k] = (s.backward, mean)
                if not last and s.forward is not None:
                    for r in range(N):
                        x = self._input(seg[s.forward], r) if k == 0 else acts[(r, k - 1)]
                        new_acts[(r, k)] = self.units[r][k].compute.forward(s.forward, x)
                    fwd_at[(k, s.forward)] = t
            acts, grads = new_acts, new_grads
            self._log_step(losses)
        assert not pending and all(not u.compute.in_flight for row in self.units for u in row)

    def _input(self, eb: tuple[int, int], r: int) -> torch.Tensor:
        return self.setup.batch(*eb, r)[0]

    # -- sync ----------------------------------------------------------------------------
    def _sync_segment(self, seg: list[tuple[int, int]]) -> None:
        K, N, M = self.config.stages, self.config.replicas, self.config.micro_batches
        B = self.config.batch_size
        if B % M:
            raise ValueError(f"sync schedule: batch_size {B} is not divisible by "
                             f"micro_batches {M}")
        sync_plan(K, M, self.config.sync_kind)  # validates kind
        for eb in seg:
            losses = []
            for r in range(N):
                x, y = self.setup.batch(*eb, r)
                for u in self.units[r]:
                    for p in u.compute.params:
                        p.grad = None
                tot_loss, tot_correct = 0.0, 0
                for m in range(M):
                    h = x[m * B // M:(m + 1) * B // M]
                    for u in self.units[r]:
                        h = u.compute.forward(m, h, live=True)
                    loss, correct = self.units[r][-1].compute.loss(
                        m, y[m * B // M:(m + 1) * B // M], scale=1.0 / M)
                    tot_loss += loss / M
                    tot_correct += correct
                    g = None
                    for u in reversed(self.units[r]):
                        g = u.compute.backward(m, g, accumulate=False)
                self.losses[(self._global(eb), r)] = (tot_loss, tot_correct)
                losses.append((tot_loss, tot_correct, len(y)))
            for k in range(K):
                self._apply(k, self._global(eb), self._backward_all(k))
                self.staleness.append((k, self._global(eb), 0))
            self._log_step(losses)

    # -- run -----------------------------------------------------------------------------
    def _log_step(self, losses: list[tuple[float, int, int]]) -> None:
        rec: dict[str, Any] = {"step": self.step}
        if losses:
            rec["loss"] = sum(l for l, _, _ in losses) / len(losses)
            rec["accuracy"] = sum(c for _, c, _ in losses) / sum(n for _, _, n in losses)
            self.iterations += 1
        self.history.append(rec)
        self.step += 1

    def evaluate(self) -> dict[str, float]:
        test, B, N = self.setup.test, self.config.batch_size, self.config.replicas
        loss_sum, correct = 0.0, 0
        for r in range(N):
            modules = [u.compute.module for u in self.units[r]]
            for a, b in eval_batches(len(test), B, N, r):
                ls, c = evaluate_model(modules, test.x[a:b].to(self.setup.dtype), test.y[a:b])
                loss_sum += ls
                correct += c
        n = max(1, len(test))
        return {"test_loss": loss_sum / n, "test_accuracy": correct / n}

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        segs = segments(self.setup)
        for seg in segs:
            if self.config.schedule == "fdg":
                self._fdg_segment(seg)
            else:
                self._sync_segment(seg)
        seconds = time.perf_counter() - t0
        samples = sum(len(s) for s in segs) * self.config.batch_size * self.config.replicas
        summary: dict[str, Any] = {
            "mode": "simulate", "schedule": self.config.schedule,
            "stages": self.config.stages, "replicas": self.config.replicas,
            "steps": self.step, "iterations": sum(len(s) for s in segs),
            "seconds": seconds, "samples_per_s": samples / seconds if seconds else 0.0,
            "final_train_loss": next((h["loss"] for h in reversed(self.history)
                                      if "loss" in h), None),
            "staleness": observed_staleness(self.staleness),
            "stash_peak_bytes": [u.compute.peak_stash_bytes for u in self.units[0]],
            "stage_params": [len(u.compute.params) and sum(p.numel() for p in u.compute.params)
                             for u in self.units[0]],
            "split": self.setup.split,
        }
        summary.update(self.evaluate())
        return summary

    def parameters(self, replica: int = 0) -> list[list[torch.Tensor]]:
        """Per stage, the parameters of `replica` (detached)."""
        return [[p.detach() for p in u.compute.params] for u in self.units[replica]]


def observed_staleness(records: list[tuple[int, int, int]]) -> dict[int, list[int]]:
    """Per stage, the sorted set of observed staleness values."""
    out: dict[int, set[int]] = {}
    for k, _, s in records:
        out.setdefault(k, set()).add(s)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def simulate(config: Any, model: nn.Sequential | None = None,
             data: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Train per `config` on K x N virtual ranks in this process; the summary dict."""
    torch.manual_seed(config.seed)
    return Reference(config, model, data).run()
