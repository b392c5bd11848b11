"""DpsgsProcessGroup: torch.distributed's ProcessGroup over the dpsgs C++ core.

Each torch call becomes one or a few operations of a `dpsgs._C.OpEngine` (csrc/op_engine.*)
on this group's MPI communicator; its `DpsgsWork` completes when the core's do. Supported
on CPU tensors: allreduce (SUM, AVG, MIN, MAX, PRODUCT) and allreduce_coalesced, broadcast,
reduce, gather and scatter (to or from a root; so gather_object and scatter_object_list),
allgather, all_gather_single (all_gather_into_tensor), reduce_scatter, reduce_scatter_single
(reduce_scatter_tensor), all_to_all_single and alltoall, barrier, tagged send/recv (so
batch_isend_irecv), plus the coalesced gather/scatter forms torch's coalescing manager uses.
Any other operation raises one NotImplementedError naming it. CUDA tensors go to a NCCL
process group over the same store, made on first use — written, not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dpsgs.distributed.tensors import (Staged, byte_view, check_cpu, pack, reduction_of, stage,
                                       stage_for_reduction, typed)
from dpsgs.distributed.work import DpsgsWork

__all__ = ["BACKEND_NAME", "SUPPORTED", "DpsgsProcessGroup"]

BACKEND_NAME = "dpsgs"
SUPPORTED = ("allreduce", "allreduce_coalesced", "broadcast", "reduce", "allgather", "allgather_coalesced",
             "all_gather_single", "all_gather_single_coalesced", "gather", "scatter", "reduce_scatter",
             "reduce_scatter_single", "reduce_scatter_single_coalesced", "all_to_all_single",
             "alltoall", "barrier", "send", "recv")


def _any_cuda(*groups: Sequence[torch.Tensor]) -> bool:
    return any(t.is_cuda for g in groups for t in g)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy's (or the tensor's own) memory as a 1-D uint8 tensor."""
    c = t.contiguous().reshape(-1)
    return c.view(torch.uint8) if c.numel() else torch.empty(0, dtype=torch.uint8)


def _unpack_bytes(flat: torch.Tensor, outs: Sequence[torch.Tensor], displs: Sequence[int]) -> None:
    for o, d in zip(outs, displs, strict=True):
        n = o.numel() * o.element_size()
        if n:
            o.copy_(flat[d:d + n].view(o.dtype).view(o.shape))


def _layout(sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    displs, at = [], 0
    for s in sizes:
        displs.append(at)
        at += s
    return list(sizes), displs


class DpsgsProcessGroup(dist.ProcessGroup):
    """One torch process group = one `OpEngine` over an MPI (sub-)communicator."""

    def __init__(self, engine: Any, store: dist.Store, timeout: timedelta) -> None:
        super().__init__(engine.rank, engine.size)
        # ours, not torch's rank()/size(): a call into a Python-subclassed group looks for an
        # override first (tens of us per call on a loaded machine)
        self._rank, self._size = engine.rank, engine.size
        self._engine = engine
        self._store = store
        self._timeout = timeout
        self._nccl: Any = None
        self._name, self._desc = "", ""

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND_NAME

    # torch names a group through its backends, and a Python group has none: it keeps them
    # (DeviceMesh and functional collectives look groups up by name).
    def _set_group_name(self, name: str) -> None:
        self._name = name

    def getGroupName(self) -> str:  # noqa: N802 (torch's name)
        return self._name

    def _set_group_desc(self, desc: str) -> None:
        self._desc = desc

    def getGroupDesc(self) -> str:  # noqa: N802 (torch's name)
        return self._desc

    @property
    def engine(self) -> Any:
        """The `dpsgs._C.OpEngine` (its `comm` is the group's `dpsgs._C.Communicator`)."""
        return self._engine

    # ---- the supported operations

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist._Work:
        opts = opts or dist.AllreduceOptions()
        if _any_cuda(tensors):
            return self._cuda().allreduce(tensors, opts)
        red, avg = self._reduction(opts.reduceOp, "all_reduce", tensors)
        staged = [stage_for_reduction(t, red, "all_reduce") for t in tensors]
        works = [self._allreduce_core(s.buf, red, opts.asyncOp) for s in staged]
        return DpsgsWork(works, tensors, self._after(staged, avg))

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> dist._Work:
        opts = opts or dist.AllreduceCoalescedOptions()
        if _any_cuda(tensors):
            return self._cuda().allreduce_coalesced(tensors, opts)
        red, avg = self._reduction(opts.reduceOp, "all_reduce_coalesced", tensors)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        works, groups = [], []
        for group in by_dtype.values():   # one operation per dtype, each over a packed copy
            flat = pack(group)
            s = stage_for_reduction(flat, red, "all_reduce_coalesced")
            works.append(self._allreduce_core(s.buf, red, opts.asyncOp))
            groups.append((group, flat, s))

        def finish() -> None:
            for group, flat, s in groups:
                if avg:
                    s.buf.div_(self._size)
                s.back()
                at = 0
                for t in group:
                    t.copy_(flat[at:at + t.numel()].view(t.shape))
                    at += t.numel()
        return DpsgsWork(works, tensors, finish)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist._Work:
        opts = opts or dist.BroadcastOptions()
        if _any_cuda(tensors):
            return self._cuda().broadcast(tensors, opts)
        check_cpu("broadcast", tensors)
        staged = [stage(t) for t in tensors]
        works = [self._engine.broadcast(byte_view(s.buf), opts.rootRank, wake=opts.asyncOp) for s in staged]
        return DpsgsWork(works, tensors, self._after(staged, False))

    def allgather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
                  opts: Any = None) -> dist._Work:
        opts = opts or dist.AllgatherOptions()
        if _any_cuda(input_tensors, *output_tensors):
            return self._cuda().allgather(output_tensors, input_tensors, opts)
        check_cpu("all_gather", input_tensors)
        works, unpacks = [], []
        for outs, inp in zip(output_tensors, input_tensors, strict=True):
            self._check_list("all_gather", outs, inp)
            if outs[self._rank].numel() != inp.numel():
                raise ValueError(f"dpsgs backend all_gather: this rank's output {self._rank} has "
                                 f"{outs[self._rank].numel()} elements, its input {inp.numel()}")
            counts, displs = _layout([o.numel() * o.element_size() for o in outs])
            flat = torch.empty(sum(counts), dtype=torch.uint8)
            works.append(self._engine.allgather(byte_view(_flat_bytes(inp)), flat.numpy(), counts, displs,
                                                wake=opts.asyncOp))
            unpacks.append((flat, outs, displs))

        def finish() -> None:
            for flat, outs, displs in unpacks:
                _unpack_bytes(flat, outs, displs)
        return DpsgsWork(works, output_tensors, finish)

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]], input_list: list[torch.Tensor],
                            opts: Any = None) -> dist._Work:
        return self.allgather(output_lists, input_list, opts)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002 (torch's name)
                          opts: Any = None) -> dist._Work:
        return self._gather_into([output], [input], opts, "all_gather_into_tensor")

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                    opts: Any = None) -> dist._Work:
        return self._gather_into(outputs, inputs, opts, "all_gather_into_tensor (coalesced)")

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def reduce_scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],
                       opts: Any = None) -> dist._Work:
        opts = opts or dist.ReduceScatterOptions()
        if _any_cuda(output_tensors, *input_tensors):
            return self._cuda().reduce_scatter(output_tensors, input_tensors, opts)
        red, avg = self._reduction(opts.reduceOp, "reduce_scatter", output_tensors)
        jobs = []
        for out, ins in zip(output_tensors, input_tensors, strict=True):
            self._check_list("reduce_scatter", ins, out)
            jobs.append((out, pack(ins), [t.numel() for t in ins]))
        return self._reduce_scatter(jobs, red, avg, "reduce_scatter", output_tensors, opts.asyncOp)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                              opts: Any = None) -> dist._Work:
        return self.reduce_scatter_single_coalesced([output], [input], opts)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                        opts: Any = None) -> dist._Work:
        opts = opts or dist.ReduceScatterOptions()
        if _any_cuda(outputs, inputs):
            return self._cuda()._reduce_scatter_base(outputs[0], inputs[0], opts) if len(outputs) == 1 \
                else self._cuda().reduce_scatter_tensor_coalesced(outputs, inputs, opts)
        red, avg = self._reduction(opts.reduceOp, "reduce_scatter_tensor", outputs)
        jobs = []
        for out, inp in zip(outputs, inputs, strict=True):
            if inp.numel() != out.numel() * self._size or inp.dtype != out.dtype:
                raise ValueError(f"dpsgs backend reduce_scatter_tensor: input {tuple(inp.shape)} "
                                 f"{inp.dtype} must be {self._size} x output {tuple(out.shape)} {out.dtype}")
            jobs.append((out, inp.contiguous().reshape(-1), [out.numel()] * self._size))
        return self._reduce_scatter(jobs, red, avg, "reduce_scatter_tensor", outputs, opts.asyncOp)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,  # noqa: A002
                          output_split_sizes: list[int], input_split_sizes: list[int],
                          opts: Any = None) -> dist._Work:
        opts = opts or dist.AllToAllOptions()
        if _any_cuda([output, input]):
            return self._cuda().alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)
        check_cpu("all_to_all_single", [output, input])
        if output.dtype != input.dtype:
            raise ValueError(f"dpsgs backend all_to_all_single: output {output.dtype} and input "
                             f"{input.dtype} differ")
        send_counts, send_displs = self._split_bytes(input, input_split_sizes, "input")
        recv_counts, recv_displs = self._split_bytes(output, output_split_sizes, "output")
        s = stage(output)
        work = self._engine.alltoall(byte_view(_flat_bytes(input)), byte_view(s.buf), send_counts,
                                     send_displs, recv_counts, recv_displs, wake=opts.asyncOp)
        return DpsgsWork([work], [output], s.back)

    alltoall_base = all_to_all_single

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> dist._Work:
        opts = opts or dist.AllToAllOptions()
        if _any_cuda(output_tensors, input_tensors):
            return self._cuda().alltoall(output_tensors, input_tensors, opts)
        check_cpu("all_to_all", [*output_tensors, *input_tensors])
        for what, ts in (("output", output_tensors), ("input", input_tensors)):
            if len(ts) != self._size:
                raise ValueError(f"dpsgs backend all_to_all: {len(ts)} {what} tensors for a group of "
                                 f"{self._size} ranks")
        send_counts, send_displs = _layout([t.numel() * t.element_size() for t in input_tensors])
        recv_counts, recv_displs = _layout([t.numel() * t.element_size() for t in output_tensors])
        packed = torch.cat([_flat_bytes(t) for t in input_tensors])
        flat = torch.empty(sum(recv_counts), dtype=torch.uint8)
        work = self._engine.alltoall(packed.numpy(), flat.numpy(), send_counts, send_displs,
                                     recv_counts, recv_displs, wake=opts.asyncOp)
        return DpsgsWork([work], output_tensors, lambda: _unpack_bytes(flat, output_tensors, recv_displs))

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist._Work:
        opts = opts or dist.ReduceOptions()
        if _any_cuda(tensors):
            return self._cuda().reduce(tensors, opts)
        red, avg = self._reduction(opts.reduceOp, "reduce", tensors)
        root = opts.rootRank
        staged = [stage_for_reduction(t, red, "reduce") for t in tensors]
        works = []
        for s in staged:
            array, code = typed(s.buf)
            works.append(self._engine.reduce(array, root, red, code, opts.asyncOp))
        # the result is the root's; the others' tensors are left as they were (only read)
        mine = staged if self._rank == root else []
        return DpsgsWork(works, tensors, self._after(mine, avg))

    def gather(self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
               opts: Any = None) -> dist._Work:
        opts = opts or dist.GatherOptions()
        if _any_cuda(input_tensors, *output_tensors):
            return self._cuda().gather(output_tensors, input_tensors, opts)
        check_cpu("gather", [*input_tensors, *(t for outs in output_tensors for t in outs)])
        root = opts.rootRank
        inp = self._one("gather", input_tensors, "input")
        flat, outs, counts, displs = None, [], [], []
        if self._rank == root:
            outs = self._one("gather", output_tensors, "list of outputs at the root")
            self._check_list("gather", outs, inp)
            if outs[root].numel() != inp.numel():
                raise ValueError(f"dpsgs backend gather: the root's output {root} has {outs[root].numel()} "
                                 f"elements, its input {inp.numel()}")
            counts, displs = _layout([o.numel() * o.element_size() for o in outs])
            flat = torch.empty(sum(counts), dtype=torch.uint8)
        work = self._engine.gather(byte_view(_flat_bytes(inp)), None if flat is None else flat.numpy(), root,
                                   counts, displs, opts.asyncOp)
        finish = (lambda: _unpack_bytes(flat, outs, displs)) if flat is not None else None
        return DpsgsWork([work], output_tensors, finish)

    def scatter(self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]],
                opts: Any = None) -> dist._Work:
        opts = opts or dist.ScatterOptions()
        if _any_cuda(output_tensors, *input_tensors):
            return self._cuda().scatter(output_tensors, input_tensors, opts)
        check_cpu("scatter", [*output_tensors, *(t for ins in input_tensors for t in ins)])
        root = opts.rootRank
        out = self._one("scatter", output_tensors, "output")
        packed, counts, displs = None, [], []
        if self._rank == root:
            ins = self._one("scatter", input_tensors, "list of inputs at the root")
            self._check_list("scatter", ins, out)
            counts, displs = _layout([t.numel() * t.element_size() for t in ins])
            packed = torch.cat([_flat_bytes(t) for t in ins])
        s = stage(out)
        work = self._engine.scatter(None if packed is None else packed.numpy(), byte_view(s.buf), root,
                                    counts, displs, opts.asyncOp)
        return DpsgsWork([work], output_tensors, self._after([s], False))

    def barrier(self, opts: Any = None) -> dist._Work:
        opts = opts or dist.BarrierOptions()
        return DpsgsWork([self._engine.barrier(wake=opts.asyncOp)], [])

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int) -> dist._Work:  # noqa: N803
        if _any_cuda(tensors):
            return self._cuda().send(tensors, dstRank, tag)
        check_cpu("send", tensors)
        works = [self._engine.send(byte_view(_flat_bytes(t)), dstRank, tag) for t in tensors]
        return DpsgsWork(works, tensors)

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int) -> dist._Work:  # noqa: N803
        if _any_cuda(tensors):
            return self._cuda().recv(tensors, srcRank, tag)
        check_cpu("recv", tensors)
        staged = [stage(t) for t in tensors]
        works = [self._engine.recv(byte_view(s.buf), srcRank, tag) for s in staged]
        return DpsgsWork(works, tensors, self._after(staged, False))

    # ---- the operations it does not implement: one clear error each

    def _not_implemented(self, op: str) -> Callable[..., Any]:
        def refuse(*_: Any, **__: Any) -> Any:
            raise NotImplementedError(
                f"dpsgs backend: {op} is not implemented; supported: {', '.join(SUPPORTED)} "
                "(put the group on gloo for it: init_process_group('cpu:gloo') or new_group(backend='gloo'))")
        return refuse

    def recv_anysource(self, *args: Any, **kwargs: Any) -> Any:
        return self._not_implemented("recv from any source")(*args, **kwargs)

    def monitored_barrier(self, *args: Any, **kwargs: Any) -> Any:
        return self._not_implemented("monitored_barrier")(*args, **kwargs)

    # ---- lifetime

    def shutdown(self) -> None:
        """Fail what is pending and stop the engine's threads (destroy_process_group, abort)."""
        self._engine.shutdown()

    abort = shutdown

    # ---- helpers

    def _allreduce_core(self, buf: torch.Tensor, red: str, wake: bool) -> Any:
        array, code = typed(buf)
        return self._engine.allreduce(array, red, code, wake)

    def _reduction(self, op: dist.ReduceOp, where: str, tensors: Sequence[torch.Tensor]) -> tuple[str, bool]:
        red, avg = reduction_of(op, where)
        check_cpu(where, tensors)
        if avg:
            for t in tensors:
                if not (t.is_floating_point() or t.is_complex()):
                    raise ValueError(f"dpsgs backend {where}: AVG of {t.dtype} is not defined "
                                     "(floating-point and complex only; use SUM and divide)")
        return red, avg

    def _after(self, staged: Sequence[Staged], avg: bool) -> Callable[[], None] | None:
        """Divide for AVG, then write staged results back into the caller's tensors (None:
        nothing to do after the data has arrived)."""
        if not avg and not any(s.copy for s in staged):
            return None
        n = self._size

        def finish() -> None:
            for s in staged:
                if avg:
                    s.buf.div_(n)
                s.back()
        return finish

    @staticmethod
    def _one(where: str, items: Sequence[Any], what: str) -> Any:
        """The one item of a rooted call's argument list (torch passes a list of one)."""
        if len(items) != 1:
            raise ValueError(f"dpsgs backend {where}: one {what} per call, got {len(items)}")
        return items[0]

    def _check_list(self, where: str, tensors: Sequence[torch.Tensor], like: torch.Tensor) -> None:
        if len(tensors) != self._size:
            raise ValueError(f"dpsgs backend {where}: {len(tensors)} tensors in the list for a group of "
                             f"{self._size} ranks")
        for i, t in enumerate(tensors):
            if t.dtype != like.dtype:
                raise ValueError(f"dpsgs backend {where}: list tensor {i} is {t.dtype}, expected {like.dtype}")
        check_cpu(where, tensors)

    def _gather_into(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any,
                     where: str) -> dist._Work:
        opts = opts or dist.AllgatherOptions()
        if _any_cuda(outputs, inputs):
            if len(outputs) == 1:
                return self._cuda()._allgather_base(outputs[0], inputs[0], opts)
            return self._cuda().allgather_into_tensor_coalesced(outputs, inputs, opts)
        check_cpu(where, [*outputs, *inputs])
        works, staged = [], []
        n = self._size
        for out, inp in zip(outputs, inputs, strict=True):
            if out.numel() != n * inp.numel() or out.dtype != inp.dtype:
                raise ValueError(f"dpsgs backend {where}: output {tuple(out.shape)} {out.dtype} must hold "
                                 f"{n} x input {tuple(inp.shape)} {inp.dtype}")
            b = inp.numel() * inp.element_size()
            s = stage(out)
            works.append(self._engine.allgather(byte_view(_flat_bytes(inp)), byte_view(s.buf), [b] * n,
                                                [r * b for r in range(n)], wake=opts.asyncOp))
            staged.append(s)
        return DpsgsWork(works, outputs, self._after(staged, False))

    def _reduce_scatter(self, jobs: list[tuple[torch.Tensor, torch.Tensor, list[int]]], red: str, avg: bool,
                        where: str, result: Any, wake: bool) -> dist._Work:
        works, staged = [], []
        for out, flat, counts in jobs:
            sin = stage_for_reduction(flat, red, where)
            sout = stage_for_reduction(out, red, where)
            per = sout.buf.numel() // max(1, out.numel()) if out.numel() else 1   # complex: 2 reals each
            arr_in, code = typed(sin.buf)
            arr_out, _ = typed(sout.buf)
            works.append(self._engine.reduce_scatter(arr_in, arr_out, red, [c * per for c in counts], code, wake))
            staged.append(sout)
        return DpsgsWork(works, result, self._after(staged, avg))

    def _split_bytes(self, t: torch.Tensor, splits: Sequence[int], what: str) -> tuple[list[int], list[int]]:
        n = self._size
        rows = t.size(0) if t.dim() else 1
        per_row = (t.numel() // rows if rows else 0) * t.element_size()
        if not splits:
            if rows % n:
                raise ValueError(f"dpsgs backend all_to_all_single: {what} has {rows} rows, not divisible "
                                 f"by the group's {n} ranks (pass split sizes)")
            splits = [rows // n] * n
        if len(splits) != n or sum(splits) != rows:
            raise ValueError(f"dpsgs backend all_to_all_single: {what} split sizes {list(splits)} must be "
                             f"{n} numbers summing to its {rows} rows")
        return _layout([s * per_row for s in splits])

    def _cuda(self) -> Any:
        """The NCCL process group CUDA tensors go to (same ranks, same store), made on first
        use — every rank reaches it at the same call, as collectives are called in order."""
        if self._nccl is None:
            if not dist.is_nccl_available():
                raise RuntimeError(f"dpsgs backend: CUDA tensors go to NCCL, but torch {torch.__version__} "
                                   "has no NCCL; move the tensors to the CPU")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self._timeout
            self._nccl = dist.ProcessGroupNCCL(dist.PrefixStore("dpsgs-nccl/", self._store), self._rank,
                                               self._size, opts)
        return self._nccl
