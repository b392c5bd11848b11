"""StageExecutor: one rank = one stage of one replica, running fdg/sync plans and evaluation.

The executor owns the stage's StageCompute, its optimizer, the channels to its pipeline
neighbours and the gradient reducer over its stage group, and runs the step order of
DESIGN §1 (dpsgs.pipeline.schedule.StageStep). It knows plans, a stage and a transport
(dpsgs.comm.protocol), not which transport: the distributed trainer runs it over MPI or
NCCL, the single-process reference over an in-process loopback, so both compute the same
numbers by construction. Every channel message is received in the order it was sent, and
every rank of a stage group starts its all-reduces at the same plan steps, so no collective
is ever issued by only some ranks. Outside code runs only at the named points of `hooks`
(dpsgs.pipeline.hooks).

Messages: every tensor crossing a cut travels forward in one channel message (the stage's
StagePlace lists them: a skip connection beside the main activation); the backward sends one
gradient per floating tensor that crossed. Floating tensors travel in the wire dtype (the
amp dtype under autocast); integer ones as they are. Parameters and buffers are named as in
the whole model (module paths), in the NaN guard's reports and in checkpoints alike.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dpsgs.comm.accelerator import Accelerator, accelerator_of_device
from dpsgs.comm.gradient_reducer import GradientReducer
from dpsgs.comm.protocol import Reducer, TensorSpec, Transport, Work
from dpsgs.config import TrainConfig
from dpsgs.pipeline.hooks import NoSpans, Spans, StepHooks
from dpsgs.pipeline.schedule import StageStep, cut_plan, sync_plan
from dpsgs.pipeline.stage import StageCompute
from dpsgs.pipeline.workload import Workload

__all__ = ["StageExecutor", "ACT_TAG", "GRAD_TAG"]

ACT_TAG, GRAD_TAG = 11, 12
Segment = list[tuple[int, int]]      # (epoch, batch) of every batch a plan admits


class _Done:
    """The all-reduce of one replica: nothing to wait for."""

    def is_completed(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> None:
        return None


class StageExecutor:
    """Grid rank `rank` of `workload`'s K x N grid; see the module docstring."""

    def __init__(self, workload: Workload, rank: int, transport: Transport,
                 hooks: StepHooks | None = None, spans: Spans | None = None) -> None:
        cfg: TrainConfig = workload.config
        self.cfg, self.workload = cfg, workload
        self.place = place = workload.place(rank)
        self.rank, self.replica, self.stage = rank, place.replica, place.stage
        self.K, self.N = place.stages, place.replicas
        self.transport = transport
        # the device seam (dpsgs.comm.accelerator): NcclTransport carries its own; the MPI
        # core and the loopback name a torch device
        self.accel = getattr(transport, "accel", None) or accelerator_of_device(transport.device)
        self.device = self.accel.device
        self.hooks = hooks or StepHooks()
        self.spans = spans or NoSpans()
        shrink = cfg.shrink if cfg.schedule == "fdg" else 1.0
        module = workload.stage_module(place.replica, place.stage).to(self.device)
        self.compute = StageCompute(module, place.stage, self.K, cfg.stash, shrink, place.amp,
                                    accel=self.accel)
        if self.accel.lazy_kernels:     # before any channel or reducer exists (see warm_up)
            self._warm_up()
        self.optimizer = workload.make_optimizer(self.compute.params)
        # named as in the whole model: a stage module keeps the model's module paths
        self._named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        k, r = place.stage, place.replica
        self.act_in = self.grad_out = self.act_out = self.grad_in = None
        if k > 0:
            self.act_in = transport.channel(rank - 1, ACT_TAG, False, f"act r{r} s{k - 1}->s{k}")
            self.grad_out = transport.channel(rank - 1, GRAD_TAG, True, f"grad r{r} s{k}->s{k - 1}")
        if k < self.K - 1:
            self.act_out = transport.channel(rank + 1, ACT_TAG, True, f"act r{r} s{k}->s{k + 1}")
            self.grad_in = transport.channel(rank + 1, GRAD_TAG, False, f"grad r{r} s{k + 1}->s{k}")
        self.reducer = self._make_reducer()
        self._sends: list[Work] = []
        self.step = 0          # the global step being executed (for hooks outside a plan)
        self.eval_nonfinite = 0    # last stage: non-finite per-sample losses of the last evaluate

    def _make_reducer(self) -> Reducer | None:
        """The stage group's averaging reducer. overlap=step backpropagates while the last
        step's all-reduce runs, so it keeps two gradient sets, on one replica too (where the
        'all-reduce' is a no-op). None when there is nothing to hold or average."""
        if not self.compute.params:
            return None
        step_overlap = self.cfg.schedule == "fdg" and self.cfg.overlap == "step"
        if self.N > 1:
            return self.transport.reducer(self.compute.params, buffers=2 if step_overlap else 1)
        if step_overlap:
            return GradientReducer(self.compute.params, lambda flat: _Done(), buffers=2)
        return None

    def _warm_up(self) -> None:
        """Load the stage's kernels once, on zeros of the shapes it will see (the training
        batch, or its micro-batch under sync), before the transport connects."""
        rows = self._micro_rows() if self.cfg.schedule == "sync" else self.cfg.batch_size
        xs = [torch.zeros((rows, *shape), dtype=dtype, device=self.device)
              for dtype, shape in self.place.in_specs]
        y = (torch.zeros(rows, dtype=torch.long, device=self.device)
             if self.compute.is_last else None)
        self.compute.warm_up(xs, y)     # no span: it would count in step 0's compute time

    # -- helpers -------------------------------------------------------------------------
    def _micro_rows(self) -> int:
        """Rows of one sync micro-batch (TrainConfig refuses a batch they do not divide)."""
        B, M = self.cfg.batch_size, self.cfg.micro_batches
        if B % M:
            raise ValueError(f"sync schedule: batch_size {B} is not divisible by "
                             f"micro_batches {M}")
        return B // M

    def _global(self, eb: tuple[int, int]) -> int:
        return eb[0] * self.workload.batches_per_epoch + eb[1]

    def _recv(self, ch: Any, rows: int, specs: tuple[TensorSpec, ...],
              what: str) -> tuple[torch.Tensor, ...]:
        with self.spans.span(f"recv {what}", "channel"):
            # owned tensors (transport contract)
            return ch.recv([(dtype, (rows, *shape)) for dtype, shape in specs])

    def _send(self, ch: Any, ts: tuple[torch.Tensor, ...], specs: tuple[TensorSpec, ...],
              what: str) -> None:
        with self.spans.span(f"send {what}", "channel"):
            # under autocast a stage may end in float32 (a norm, a softmax): the wire is fixed
            self._sends.append(ch.send(tuple(t.to(dtype).contiguous()
                                             for t, (dtype, _) in zip(ts, specs))))
            # keep only handles still in flight (the channel bounds them at two anyway)
            self._sends = [w for w in self._sends if not w.is_completed()]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host batch onto this rank's device without blocking the host (pinned first)."""
        return self.accel.to_device(t)

    def _backward(self, key: Any, grads: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
        """Batch `key`'s backward where the device runs autograd (the reducer's hooks fire on
        CUDA's autograd thread, and on the simulator's, not on this one)."""
        return self.accel.backward(lambda: self.compute.backward(key, grads))

    def _input(self, eb: tuple[int, int]) -> torch.Tensor:
        return self._to_device(self.workload.inputs(*eb, self.replica))

    def _labels(self, eb: tuple[int, int]) -> torch.Tensor:
        return self._to_device(self.workload.labels(*eb, self.replica))

    def wait_sends(self) -> None:
        with self.spans.span("send drain", "channel"):
            for w in self._sends:
                w.wait()
        self._sends = []

    def _zero_grad(self) -> None:
        if self.reducer is not None:
            self.reducer.zero_grad()
        else:
            for p in self.compute.params:
                p.grad = None

    def _start_reduce(self) -> None:
        if self.reducer is not None:
            self.reducer.start_all()

    def _apply(self, g: int, step: int) -> bool:
        """Wait for the averaged gradient and step the optimizer for global batch g; False
        when the hooks vetoed the update (a non-finite gradient)."""
        self.hooks.phase("reduce", step)
        if self.reducer is not None:
            with self.spans.span("reduce wait", "reduce"):
                self.reducer.wait()
        if self.optimizer is None:
            return True              # nothing to update: the stage has no parameters
        if not self.hooks.update_ok(step, [(n, p.grad) for n, p in self._named]):
            return False
        with self.spans.span("update", "compute"):
            self.optimizer.step(g)
        return True

    def _forward(self, key: Any, xs: tuple[torch.Tensor, ...], step: int, what: str,
                 live: bool = False) -> tuple[torch.Tensor, ...]:
        self.hooks.phase("forward", step)
        with self.spans.span(f"forward {what}", "compute"):
            return self.compute.forward(key, xs, live=live)

    def _top_of_step(self, i: int, step: int, admitted: int, warmup: int) -> None:
        """Step i of a plan whose first `warmup` steps fill the pipeline and whose steps from
        `admitted` on drain it: the named phases for the hooks (fault points)."""
        self.step = step
        if i < warmup:
            self.hooks.phase("warmup", step)
        if i >= admitted:
            self.hooks.phase("flush", step)

    # -- fdg -----------------------------------------------------------------------------
    def run_fdg(self, plan: list[list[StageStep]], seg: Segment, step0: int) -> bool:
        """Run one fdg plan over segment `seg`; step0 = global step of the plan's first.
        True when a hook asked to stop and the plan was cut short (then flushed)."""
        k, last, place = self.stage, self.compute.is_last, self.place
        B = self.cfg.batch_size
        fwd_at: dict[int, int] = {}
        cut, i = False, 0
        while i < len(plan):
            s, t = plan[i][k], i
            step = step0 + t
            self._top_of_step(t, step, len(seg), 2 * self.K - 2)
            x = g = None
            if s.forward is not None:
                x = (self._recv(self.act_in, B, place.in_specs, f"act b{s.forward}") if k > 0
                     else (self._input(seg[s.forward]),))
            if s.backward is not None and not last:
                g = self._recv(self.grad_in, B, place.out_grads, f"grad b{s.backward}")
            if last and s.forward is not None:   # the last stage's loss comes from this forward
                self._forward(s.forward, x, step, f"b{s.forward}", live=True)
                fwd_at[s.forward] = t
            if s.backward is not None:
                self._zero_grad()
                self.hooks.phase("backward", step)
                with self.spans.span(f"backward b{s.backward}", "compute"):
                    if last:
                        eb = seg[s.backward]
                        y = self._labels(eb)
                        loss, correct = self.compute.loss(s.backward, y)
                        self.hooks.loss(step, self._global(eb), loss, correct, len(y))
                        gi = self._backward(s.backward, None)
                    else:
                        gi = self._backward(s.backward, g)
                if k > 0:
                    self._send(self.grad_out, gi, place.in_grads, f"grad b{s.backward}")
                self._start_reduce()
            if s.apply is not None:
                batch = self._global(seg[s.apply])
                staleness = t - fwd_at.pop(s.apply)
                if self._apply(batch, step):
                    self.hooks.updated(k, batch, staleness)
            if not last and s.forward is not None:
                out = self._forward(s.forward, x, step, f"b{s.forward}")
                fwd_at[s.forward] = t
                self._send(self.act_out, out, place.out_specs, f"act b{s.forward}")
            if self.hooks.step_done(step) and cut_plan(plan, seg, t + 1, self.cfg.overlap):
                cut = True
            i += 1
        self.wait_sends()
        if self.compute.in_flight or fwd_at:
            raise RuntimeError(f"rank {self.rank} (replica {self.replica}, stage {k}): batches "
                               f"{self.compute.in_flight} still in flight after the flush")
        return cut

    # -- sync ----------------------------------------------------------------------------
    def run_sync(self, seg: Segment, step0: int) -> bool:
        """One synchronous micro-batched step per global batch of `seg` (exact gradient).
        True when a hook asked to stop and the segment was cut short."""
        k, last, place = self.stage, self.compute.is_last, self.place
        M, mb = self.cfg.micro_batches, self._micro_rows()
        ops = sync_plan(self.K, M, self.cfg.sync_kind)[k]
        cut, i = False, 0
        while i < len(seg):
            eb, step = seg[i], step0 + i
            self._top_of_step(i, step, len(seg), 0)     # sync: no steps of a filling pipeline
            self._zero_grad()
            x = self._input(eb) if k == 0 else None
            y = self._labels(eb) if last else None
            tot_loss, tot_correct = 0.0, 0
            for a in ops:
                m = a.micro
                if a.op == "F":
                    h = ((x[m * mb:(m + 1) * mb],) if k == 0
                         else self._recv(self.act_in, mb, place.in_specs, f"act m{m}"))
                    out = self._forward(m, h, step, f"m{m}", live=True)
                    if last:
                        loss, correct = self.compute.loss(m, y[m * mb:(m + 1) * mb], 1.0 / M)
                        tot_loss += loss / M
                        tot_correct += correct
                    else:
                        self._send(self.act_out, out, place.out_specs, f"act m{m}")
                else:
                    g = None if last else self._recv(self.grad_in, mb, place.out_grads, f"grad m{m}")
                    self.hooks.phase("backward", step)
                    # micro-batches before the last only accumulate: the all-reduce fires
                    # once, during the last one's backward (DDP's no_sync)
                    hold = (self.reducer.no_sync() if self.reducer is not None and m < M - 1
                            else contextlib.nullcontext())
                    with self.spans.span(f"backward m{m}", "compute"), hold:
                        gi = self._backward(m, g)
                    if k > 0:
                        self._send(self.grad_out, gi, place.in_grads, f"grad m{m}")
            if last:
                self.hooks.loss(step, self._global(eb), tot_loss, tot_correct, len(y))
            self._start_reduce()
            if self._apply(self._global(eb), step):
                self.hooks.updated(k, self._global(eb), 0)
            if self.hooks.step_done(step) and i + 1 < len(seg):
                del seg[i + 1:]        # ends the loop after this step
                cut = True
            i += 1
        self.wait_sends()
        return cut

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, int, int]:
        """Pipelined forward of this replica's share of the test set (eval mode); returns
        (loss sum, correct, samples) on the last stage, zeros elsewhere; eval_nonfinite
        counts the samples whose loss was NaN or Inf (their sum is then non-finite)."""
        self.hooks.phase("eval", self.step)
        module = self.compute.module
        mode = module.training
        module.eval()
        loss_sum, correct, n = 0.0, 0, 0
        self.eval_nonfinite = 0
        try:
            for a, b in self.workload.eval_spans(self.replica):
                if self.stage == 0:
                    hs = (self._to_device(self.workload.eval_inputs(a, b)),)
                else:
                    hs = self._recv(self.act_in, b - a, self.place.in_specs, "eval act")
                with self.spans.span("eval forward", "compute"), self.compute.autocast():
                    hs = self.compute.run(hs)
                if self.compute.is_last:
                    h = hs[0]
                    y = self._to_device(self.workload.eval_labels(a, b))
                    logits = h if h.element_size() >= 4 else h.float()
                    losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
                    # one host read per batch: (loss sum, non-finite losses, correct)
                    got = self.accel.to_host(torch.stack([
                        losses.sum().to(torch.float64), (~torch.isfinite(losses)).sum().to(torch.float64),
                        (h.argmax(dim=1) == y).sum().to(torch.float64)])).tolist()
                    loss_sum += got[0]
                    self.eval_nonfinite += int(got[1])
                    correct += int(got[2])
                    n += b - a
                else:
                    self._send(self.act_out, hs, self.place.out_specs, "eval act")
            self.wait_sends()
        finally:
            module.train(mode)
        return loss_sum, correct, n

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Model and optimizer state as host tensors: a checkpoint resumes on either device."""
        return _to_host(self.accel, {"model": self.compute.module.state_dict(),
                                     "optimizer": self.optimizer.state_dict() if self.optimizer else {}})

    def buffers(self) -> dict[str, torch.Tensor]:
        """This replica's buffers (BatchNorm running statistics) as host tensors: unlike the
        weights they are not averaged, so each replica of a stage holds its own."""
        return _to_host(self.accel, dict(self.compute.module.named_buffers()))

    def load_state(self, state: dict[str, Any], buffers: dict[str, torch.Tensor] | None = None) -> None:
        """`state` from state() (any replica's); `buffers` this replica's own, where saved."""
        self.compute.module.load_state_dict({**state["model"], **(buffers or {})})
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        """Remove the reducer's hooks (the executor is done)."""
        if self.reducer is not None:
            self.reducer.close()


def _to_host(accel: Accelerator, obj: Any) -> Any:
    """`obj` with every tensor in it on the host (nested dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return accel.to_host(obj.detach())
    if isinstance(obj, dict):
        return type(obj)((k, _to_host(accel, v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(accel, v) for v in obj)
    return obj
