"""StageWorker: one rank = one stage of one replica, executing fdg/sync steps and evaluation.

The worker owns the stage's StageCompute, optimizer, channels to its pipeline neighbours
and the gradient reducer over its stage group; it follows the step order of
`dpsgs.pipeline.schedule.StageStep` exactly as `dpsgs.pipeline.reference` does, so both compute the same
numbers. Communication goes through a `transport` (dpsgs.comm.mpi over the C++ core by
default); every channel message is received in the order it was sent, and every rank of a
stage group issues its reduces at the same plan steps, so no collective is ever issued by
only some ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from dpsgs.job.run_setup import Setup, eval_batches
from dpsgs.job.optim import build_optimizer, lr_at, set_lr
from dpsgs.pipeline.schedule import StageStep, sync_plan
from dpsgs.pipeline.stage import StageCompute

__all__ = ["StageWorker", "ACT_TAG", "GRAD_TAG"]

ACT_TAG, GRAD_TAG = 11, 12


class StageWorker:
    """Stage `stage` of replica `replica`; see the module docstring."""

    def __init__(self, setup: Setup, replica: int, stage: int, rank: int, transport: Any,
                 timeline: Any) -> None:
        cfg = setup.config
        self.setup, self.cfg = setup, cfg
        self.replica, self.stage, self.rank = replica, stage, rank
        self.K, self.N = cfg.stages, cfg.replicas
        self.timeline = timeline
        module = setup.stage_layers(setup.model, stage)   # only this stage's layers are kept
        shrink = cfg.shrink if cfg.schedule == "fdg" else 1.0
        self.compute = StageCompute(module, stage, self.K, cfg.stash, shrink)
        self.optimizer = build_optimizer(self.compute.params, cfg)
        self.in_shape = setup.in_shape if stage == 0 else setup.out_shapes[stage - 1]
        self.out_shape = setup.out_shapes[stage]
        K, r = self.K, replica
        self.act_in = self.grad_out = self.act_out = self.grad_in = None
        if stage > 0:
            self.act_in = transport.channel(rank - 1, ACT_TAG, False,
                                            f"act r{r} s{stage - 1}->s{stage}")
            self.grad_out = transport.channel(rank - 1, GRAD_TAG, True,
                                              f"grad r{r} s{stage}->s{stage - 1}")
        if stage < K - 1:
            self.act_out = transport.channel(rank + 1, ACT_TAG, True,
                                             f"act r{r} s{stage}->s{stage + 1}")
            self.grad_in = transport.channel(rank + 1, GRAD_TAG, False,
                                             f"grad r{r} s{stage + 1}->s{stage}")
        # overlap=step may wait for last step's reduce after this step's backward only where
        # the backward reads no live weight (stashed weights, not the last stage): the
        # numbers stay those of the plan, and the reduce overlaps a whole step of compute
        late = (cfg.schedule == "fdg" and cfg.overlap == "step" and cfg.stash == "weights"
                and stage < self.K - 1)
        # a parameterless stage has nothing to reduce; one replica has nothing to average.
        # `buffers` is passed only when wanted, so transports that predate it still work.
        self.reducer = None
        if self.compute.params and self.N > 1:
            extra = {"buffers": 2} if late else {}
            self.reducer = transport.reducer(self.compute.params, **extra)
        # the backward may only run during a reduce if it writes the other gradient set
        self._apply_late = late and getattr(self.reducer, "buffers", 1) == 2
        self._sends: list[Any] = []
        self.losses: dict[int, tuple[float, int, int]] = {}   # global batch -> loss, correct, n
        self.staleness: list[tuple[int, int, int]] = []       # (stage, global batch, steps)
        self.step_losses: dict[int, tuple[float, int, int]] = {}  # plan step -> same

    # -- helpers -------------------------------------------------------------------------
    def _global(self, eb: tuple[int, int]) -> int:
        return eb[0] * self.setup.batches_per_epoch + eb[1]

    def _recv(self, ch: Any, rows: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
        with self.timeline.span(f"recv {what}", "channel"):
            return ch.recv(self.setup.dtype, (rows, *shape))   # an owned copy (transport contract)

    def _send(self, ch: Any, t: torch.Tensor, what: str) -> None:
        with self.timeline.span(f"send {what}", "channel"):
            self._sends.append(ch.send(t.contiguous()))
            # keep only handles still in flight (the channel bounds them at two anyway)
            self._sends = [w for w in self._sends if not w.is_completed()]

    def wait_sends(self) -> None:
        with self.timeline.span("send drain", "channel"):
            for w in self._sends:
                w.wait()
        self._sends = []

    def _zero_grad(self) -> None:
        if self.reducer is not None:
            self.reducer.zero_grad()
        else:
            for p in self.compute.params:
                p.grad = None

    def _apply(self, g: int) -> None:
        """Wait for the averaged gradient (if replicas) and step the optimizer for batch g."""
        if self.reducer is not None:
            with self.timeline.span("reduce wait", "reduce"):
                self.reducer.wait()
        if self.optimizer is not None:
            with self.timeline.span("update", "compute"):
                set_lr(self.optimizer, lr_at(g, self.setup.total_iterations, self.cfg,
                                             self.setup.batches_per_epoch))
                self.optimizer.step()

    def _start_reduce(self) -> None:
        if self.reducer is not None:
            self.reducer.start_all()

    @property
    def _hooks_ok(self) -> bool:
        """May backward accumulate through autograd (firing the reducer's hooks)? Only with
        no reducer, or one that can hold its all-reduce during accumulation (no_sync)."""
        return self.reducer is None or hasattr(self.reducer, "no_sync")

    def _accumulating(self, hold: bool) -> Any:
        """Micro-batches before the last only accumulate: the all-reduce fires once, during
        the last micro-batch's backward (DDP's no_sync); without no_sync the backward adds
        into p.grad by hand (accumulate=False) and the reduce starts after it."""
        if hold and self.reducer is not None and hasattr(self.reducer, "no_sync"):
            return self.reducer.no_sync()
        return contextlib.nullcontext()

    def _labels(self, eb: tuple[int, int]) -> torch.Tensor:
        return self.setup.labels(*eb, self.replica)

    # -- fdg -----------------------------------------------------------------------------
    def run_fdg(self, plan: list[list[StageStep]], seg: list[tuple[int, int]], step0: int,
                on_step: Callable[[int], None] | None = None) -> None:
        """Run one fdg plan over segment `seg`; step0 = global step of the plan's first."""
        k, last = self.stage, self.compute.is_last
        B = self.cfg.batch_size
        overlap = self.cfg.overlap
        fwd_at: dict[int, int] = {}
        for row in plan:
            s = row[k]
            t = s.step
            x = g = None
            if s.forward is not None:
                if k > 0:
                    x = self._recv(self.act_in, B, self.in_shape, f"act b{s.forward}")
                else:
                    x = self.setup.batch(*seg[s.forward], self.replica)[0]
            if s.backward is not None and not last:
                g = self._recv(self.grad_in, B, self.out_shape, f"grad b{s.backward}")
            if overlap == "step" and s.apply is not None and not self._apply_late:
                self._apply(self._global(seg[s.apply]))
                self.staleness.append((k, self._global(seg[s.apply]), t - fwd_at.pop(s.apply)))
            if last and s.forward is not None:
                with self.timeline.span(f"forward b{s.forward}", "compute"):
                    self.compute.forward(s.forward, x, live=True)
                fwd_at[s.forward] = t
            if s.backward is not None:
                self._zero_grad()
                with self.timeline.span(f"backward b{s.backward}", "compute"):
                    if last:
                        y = self._labels(seg[s.backward])
                        loss, correct = self.compute.loss(s.backward, y)
                        rec = (loss, correct, len(y))
                        self.losses[self._global(seg[s.backward])] = rec
                        self.step_losses[step0 + t] = rec
                        gi = self.compute.backward(s.backward)
                    else:
                        gi = self.compute.backward(s.backward, g)
                if k > 0:
                    self._send(self.grad_out, gi, f"grad b{s.backward}")
                self._start_reduce()
            if s.apply is not None and (overlap == "backward" or self._apply_late):
                self._apply(self._global(seg[s.apply]))
                self.staleness.append((k, self._global(seg[s.apply]), t - fwd_at.pop(s.apply)))
            if not last and s.forward is not None:
                with self.timeline.span(f"forward b{s.forward}", "compute"):
                    out = self.compute.forward(s.forward, x)
                fwd_at[s.forward] = t
                self._send(self.act_out, out, f"act b{s.forward}")
            if on_step is not None:
                on_step(step0 + t)
        self.wait_sends()
        if self.compute.in_flight or fwd_at:
            raise RuntimeError(f"rank {self.rank} (replica {self.replica}, stage {k}): batches "
                               f"{self.compute.in_flight} still in flight after the flush")

    # -- sync ----------------------------------------------------------------------------
    def run_sync(self, seg: list[tuple[int, int]], step0: int,
                 on_step: Callable[[int], None] | None = None) -> None:
        """One synchronous micro-batched step per global batch of `seg` (exact gradient)."""
        k, last = self.stage, self.compute.is_last
        B, M = self.cfg.batch_size, self.cfg.micro_batches
        if B % M:
            raise ValueError(f"sync schedule: batch_size {B} is not divisible by "
                             f"micro_batches {M}")
        mb = B // M
        ops = sync_plan(self.K, M, self.cfg.sync_kind)[k]
        for i, eb in enumerate(seg):
            self._zero_grad()
            x = y = None
            if k == 0:
                x = self.setup.batch(*eb, self.replica)[0]
            if last:
                y = self._labels(eb)
            tot_loss, tot_correct = 0.0, 0
            for a in ops:
                m = a.micro
                if a.op == "F":
                    h = (x[m * mb:(m + 1) * mb] if k == 0
                         else self._recv(self.act_in, mb, self.in_shape, f"act m{m}"))
                    with self.timeline.span(f"forward m{m}", "compute"):
                        out = self.compute.forward(m, h, live=True)
                        if last:
                            loss, correct = self.compute.loss(m, y[m * mb:(m + 1) * mb], 1.0 / M)
                            tot_loss += loss / M
                            tot_correct += correct
                    if not last:
                        self._send(self.act_out, out, f"act m{m}")
                else:
                    g = None if last else self._recv(self.grad_in, mb, self.out_shape, f"grad m{m}")
                    hold = self._accumulating(m < M - 1)
                    with self.timeline.span(f"backward m{m}", "compute"), hold:
                        gi = self.compute.backward(m, g, accumulate=self._hooks_ok)
                    if k > 0:
                        self._send(self.grad_out, gi, f"grad m{m}")
            if last:
                rec = (tot_loss, tot_correct, len(y))
                self.losses[self._global(eb)] = rec
                self.step_losses[step0 + i] = rec
            self._start_reduce()
            self._apply(self._global(eb))
            self.staleness.append((k, self._global(eb), 0))
            if on_step is not None:
                on_step(step0 + i)
        self.wait_sends()

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, int, int]:
        """Pipelined forward of this replica's share of the test set (eval mode); returns
        (loss sum, correct, samples) on the last stage, zeros elsewhere."""
        test, B = self.setup.test, self.cfg.batch_size
        module = self.compute.module
        mode = module.training
        module.eval()
        loss_sum, correct, n = 0.0, 0, 0
        try:
            for a, b in eval_batches(len(test), B, self.N, self.replica):
                if self.stage == 0:
                    h = test.x[a:b].to(self.setup.dtype)
                else:
                    h = self._recv(self.act_in, b - a, self.in_shape, "eval act")
                with self.timeline.span("eval forward", "compute"):
                    h = module(h)
                if self.compute.is_last:
                    y = test.y[a:b]
                    loss_sum += float(torch.nn.functional.cross_entropy(h, y, reduction="sum"))
                    correct += int((h.argmax(dim=1) == y).sum())
                    n += b - a
                else:
                    self._send(self.act_out, h, "eval act")
            self.wait_sends()
        finally:
            module.train(mode)
        return loss_sum, correct, n

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"model": self.compute.module.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else {}}

    def load_state(self, state: dict[str, Any]) -> None:
        self.compute.module.load_state_dict(state["model"])
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
