"""Rank program (2-4 ranks): every operation of the "dpsgs" torch.distributed backend against
gloo's answer on the same ranks and inputs (gloo rendezvouses over the same mpi:// store).

Exactness: data movement, MIN/MAX and integer reductions must be bit-identical at any size;
float SUM/AVG/PRODUCT bit-identical on 2 ranks (a + b and a * b do not depend on the order)
and beyond within the sum of both orders' worst-case rounding error: |dpsgs - gloo| <=
2(n-1)·u·Σ|x_i| for sums (+ 2u|result| for AVG's division), 2.5(n-1)·u·|result| for
products, u the unit roundoff of the dtype. Rooted: reduce (a non-root's tensor is left as it
was), gather, scatter, gather_object, scatter_object_list. Also: async Works (wait, get_future), the
backend's refusals, inputs that alias their outputs (in-place all-gather, reduce-scatter and
all-to-all), a new_group of a subset against gloo's subset, non-members untouched,
DeviceMesh dimensions, a functional collective and torch's store-based barrier.
Prints `OK <count> cases` on rank 0 when every rank passed."""

from __future__ import annotations

import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

import dpsgs.distributed  # noqa: F401  (registers "dpsgs" and mpi://)

warnings.filterwarnings("ignore", category=FutureWarning)   # the *_tensor names, tested as users call them
dist.init_process_group("dpsgs", init_method="mpi://", timeout=timedelta(seconds=60))
r, n = dist.get_rank(), dist.get_world_size()
DP, GLOO = dist.group.WORLD, dist.new_group(backend="gloo")
assert dist.get_backend(DP) == "dpsgs" and type(DP).__name__ == "DpsgsProcessGroup"
R = dist.ReduceOp
failures: list[str] = []
cases = 0

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int32, torch.int64, torch.int8, torch.uint8]
ANY = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
       torch.complex64]
BYTES_ONLY = [torch.int16, torch.complex128]   # gloo cannot move these: checked against closed forms


def data(shape: tuple[int, ...], dtype: torch.dtype, seed: int, rank: int = -1) -> torch.Tensor:
    """This rank's input (seeded by case and rank): floats ~N(0,1), ints in -3..3 (no overflow)."""
    g = torch.Generator().manual_seed(1000 * seed + (r if rank < 0 else rank))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    lo = 0 if dtype == torch.uint8 else -3
    return torch.randint(lo, 4, shape, generator=g).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:   # gloo's bool SUM leaves bytes of 2: compare truth values
        t = t.to(torch.uint8) != 0
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor | None = None) -> None:
    global cases
    cases += 1
    if got.dtype != ref.dtype or got.shape != ref.shape:
        failures.append(f"{name}: {got.dtype} {tuple(got.shape)} vs gloo {ref.dtype} {tuple(ref.shape)}")
    elif tol is None or n == 2:
        if not torch.equal(bits(got), bits(ref)):
            bad = (got != ref).reshape(-1).nonzero()
            i = int(bad[0]) if len(bad) else 0
            failures.append(f"{name}: not bit-identical to gloo (element {i}: "
                            f"{got.reshape(-1)[i].item()} vs {ref.reshape(-1)[i].item()})")
    else:
        diff = (got.to(torch.complex128 if got.is_complex() else torch.float64) -
                ref.to(torch.complex128 if ref.is_complex() else torch.float64)).abs()
        over = diff > tol
        if over.any():
            i = int(over.reshape(-1).nonzero()[0])
            failures.append(f"{name}: |dpsgs - gloo| = {diff.reshape(-1)[i].item():.3g} > "
                            f"{tol.reshape(-1)[i].item():.3g} at element {i}")


def unit_roundoff(dtype: torch.dtype) -> float:
    real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    return torch.finfo(real).eps / 2


def sum_tolerance(x: torch.Tensor, ref: torch.Tensor, op: R) -> torch.Tensor | None:
    """None: must be exact. Else the elementwise bound in the module docstring."""
    if not (x.is_floating_point() or x.is_complex()) or op in (R.MIN, R.MAX):
        return None
    u = unit_roundoff(x.dtype)
    if op == R.PRODUCT:
        return 2.5 * (n - 1) * u * ref.to(torch.float64).abs() + 1e-300
    mag = x.to(torch.complex128 if x.is_complex() else torch.float64).abs()
    dist.all_reduce(mag, group=GLOO)   # Σ|x_i|
    tol = 2 * (n - 1) * u * mag
    if op == R.AVG:
        tol = tol / n + 2 * u * ref.to(torch.complex128 if ref.is_complex() else torch.float64).abs()
    return tol


def rs_tolerance(base: torch.Tensor, ref: torch.Tensor, op: R) -> torch.Tensor | None:
    """sum_tolerance for this rank's block of a reduce-scatter of `base` (n equal blocks)."""
    if not base.is_floating_point() or op in (R.MIN, R.MAX):
        return None
    u = unit_roundoff(base.dtype)
    mag = base.to(torch.float64).abs()
    dist.all_reduce(mag, group=GLOO)
    tol = 2 * (n - 1) * u * mag.chunk(n)[r]
    return tol / n + 2 * u * ref.to(torch.float64).abs() if op == R.AVG else tol


def abs_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    mag = x.to(torch.float64).abs()
    dist.all_reduce(mag, group=group)
    return mag


def both(fn):  # runs fn(group) on dpsgs, then gloo; returns the two results
    return fn(DP), fn(GLOO)


def contiguous_for_gloo(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """gloo (torch 2.13) reduces/broadcasts the wrong elements of a non-contiguous tensor
    (it ignores the strides), so its reference runs on a contiguous copy of the same values;
    dpsgs gets the strided view itself."""
    return t.contiguous() if group is GLOO else t


# ---- all_reduce: dtype x op x shape (0, 1, odd, non-contiguous, ring-sized)
seed = 0
SHAPES = [(0,), (1,), (1001,), "noncontig"]
for dtype in FLOATS + INTS + [torch.bool, torch.complex64]:
    ops = [R.SUM, R.MIN, R.MAX, R.PRODUCT] + ([R.AVG] if dtype.is_floating_point or dtype.is_complex else [])
    if dtype.is_complex:
        ops = [R.SUM, R.AVG]
    for op in ops:
        for shape in SHAPES:
            seed += 1
            base = data((7, 9), dtype, seed)[:, 2] if shape == "noncontig" else data(shape, dtype, seed)

            def run(group, base=base, op=op):
                t = base.clone() if shape != "noncontig" else torch.stack([base, base], 1)[:, 0]
                assert shape != "noncontig" or not t.is_contiguous()
                t = contiguous_for_gloo(t, group)
                dist.all_reduce(t, op=op, group=group)
                return t
            got, ref = both(run)
            close(f"all_reduce {dtype} {op} {shape}", got, ref, sum_tolerance(base, ref, op))

# ring-sized (the core's ring from 4 MiB), float32 and bfloat16, async with wait() and a future
for dtype, op in [(torch.float32, R.SUM), (torch.float32, R.AVG), (torch.bfloat16, R.SUM)]:
    seed += 1
    base = data((1_500_003,), dtype, seed)

    def run_async(group, base=base, op=op, future=False):
        t = base.clone()
        w = dist.all_reduce(t, op=op, group=group, async_op=True)
        if future:
            (out,) = w.get_future().wait()
            assert out is t
        else:
            w.wait()
        return t
    got, ref = both(run_async)
    close(f"all_reduce ring {dtype} {op} (wait)", got, ref, sum_tolerance(base, ref, op))
    got = run_async(DP, future=True)
    close(f"all_reduce ring {dtype} {op} (future)", got, ref, sum_tolerance(base, ref, op))

# all_reduce_coalesced
for op in (R.SUM, R.AVG):
    seed += 1
    parts = [data((5,), torch.float32, seed), data((3, 2), torch.float32, seed + 1), data((0,), torch.float32, seed)]

    def coalesced(group, parts=parts, op=op):
        ts = [p.clone() for p in parts]
        dist.all_reduce_coalesced(ts, op=op, group=group)
        return torch.cat([t.reshape(-1) for t in ts])
    got, ref = both(coalesced)
    close(f"all_reduce_coalesced {op}", got, ref, sum_tolerance(torch.cat([p.reshape(-1) for p in parts]), ref, op))

# ---- broadcast: every root, any dtype, non-contiguous
for dtype in ANY:
    for root in range(n):
        seed += 1
        base = data((6, 5), dtype, seed)

        def bcast(group, base=base, root=root):
            t = contiguous_for_gloo(base.clone()[:, 1], group)
            dist.broadcast(t, src=root, group=group)
            return t
        close(f"broadcast {dtype} root {root}", *both(bcast))

# ---- all_gather (list), all_gather_into_tensor
for dtype in ANY:
    seed += 1
    base = data((4, 3), dtype, seed)

    def gather_list(group, base=base):
        outs = [torch.empty_like(base) for _ in range(n)]
        dist.all_gather(outs, base, group=group)
        return torch.stack(outs)

    def gather_tensor(group, base=base):
        out = torch.empty((n * 4, 3), dtype=base.dtype)
        dist.all_gather_into_tensor(out, base, group=group)
        return out
    close(f"all_gather {dtype}", *both(gather_list))
    close(f"all_gather_into_tensor {dtype}", *both(gather_tensor))

# ---- reduce_scatter (list), reduce_scatter_tensor
for dtype, op in [(torch.float32, R.SUM), (torch.float32, R.AVG), (torch.float64, R.MAX), (torch.int64, R.SUM),
                  (torch.bfloat16, R.SUM), (torch.float16, R.MIN)]:
    seed += 1
    base = data((n * 6,), dtype, seed)

    def rs_list(group, base=base, op=op):
        out = torch.empty(6, dtype=base.dtype)
        dist.reduce_scatter(out, list(base.clone().chunk(n)), op=op, group=group)
        return out

    def rs_tensor(group, base=base, op=op):
        out = torch.empty(6, dtype=base.dtype)
        dist.reduce_scatter_tensor(out, base.clone(), op=op, group=group)
        return out
    got, ref = both(rs_list)
    close(f"reduce_scatter {dtype} {op}", got, ref, rs_tolerance(base, ref, op))
    got, ref = both(rs_tensor)
    close(f"reduce_scatter_tensor {dtype} {op}", got, ref, rs_tolerance(base, ref, op))

# ---- all_to_all_single (equal and uneven splits), all_to_all (list)
for dtype in (torch.float32, torch.complex64):
    seed += 1
    base = data((n * 3, 2), dtype, seed)

    def a2a_equal(group, base=base):
        out = torch.empty_like(base)
        dist.all_to_all_single(out, base, group=group)
        return out
    close(f"all_to_all_single {dtype}", *both(a2a_equal))
    # rank r sends (q + r) % 3 + 1 rows to rank q
    sends = [(q + r) % 3 + 1 for q in range(n)]
    recvs = [(r + q) % 3 + 1 for q in range(n)]
    uneven = data((sum(sends), 2), dtype, seed + 500)

    def a2a_uneven(group, uneven=uneven, sends=sends, recvs=recvs):
        out = torch.empty((sum(recvs), 2), dtype=uneven.dtype)
        dist.all_to_all_single(out, uneven, output_split_sizes=recvs, input_split_sizes=sends, group=group)
        return out
    close(f"all_to_all_single uneven {dtype}", *both(a2a_uneven))

    def a2a_list(group, base=base):
        outs = [torch.empty((3, 2), dtype=base.dtype) for _ in range(n)]
        dist.all_to_all(outs, list(base.chunk(n)), group=group)
        return torch.cat(outs)
    close(f"all_to_all {dtype}", *both(a2a_list))

# ---- rooted: reduce (every op, root first and last), gather and scatter (list of tensors)
for dtype, op in [(torch.float32, R.SUM), (torch.float32, R.AVG), (torch.float64, R.MAX), (torch.int64, R.SUM),
                  (torch.bfloat16, R.SUM), (torch.float16, R.MIN), (torch.float32, R.PRODUCT)]:
    for root in (0, n - 1):
        seed += 1
        base = data((5, 3), dtype, seed)

        def reduce_to(group, base=base, op=op, root=root):
            t = base.clone()
            dist.reduce(t, dst=root, op=op, group=group)
            return t
        got, ref = both(reduce_to)
        tol = sum_tolerance(base, ref, op)   # a collective: every rank
        if r == root:
            close(f"reduce {dtype} {op} to {root}", got, ref, tol)
        else:   # only read: left as it was
            close(f"reduce {dtype} {op} to {root}: a non-root's tensor", got, base)
for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
    for root in (0, n - 1):
        seed += 1
        base = data((4, 3), dtype, seed)

        def gather_to(group, base=base, root=root):
            outs = [torch.full_like(base, 7) for _ in range(n)] if r == root else None
            dist.gather(base, outs, dst=root, group=group)
            return torch.stack(outs) if outs is not None else base
        close(f"gather {dtype} to {root}", *both(gather_to))
        pieces = [data((4, 3), dtype, seed + 500, rank=q) for q in range(n)]

        def scatter_from(group, pieces=pieces, root=root):
            out = torch.zeros((4, 3), dtype=pieces[0].dtype)
            dist.scatter(out, pieces if r == root else None, src=root, group=group)
            return out
        close(f"scatter {dtype} from {root}", *both(scatter_from))
objs = [None] * n if r == 0 else None
dist.gather_object({"rank": r, "word": "x" * (r + 1)}, objs, dst=0)
if r == 0:
    close("gather_object", torch.tensor([len(o["word"]) for o in objs]), torch.arange(1, n + 1))
got = [None]
dist.scatter_object_list(got, [{"to": q} for q in range(n)] if r == n - 1 else None, src=n - 1)
close("scatter_object_list", torch.tensor(got[0]["to"]), torch.tensor(r))

# ---- an input that aliases the output (MPI forbids it; torch allows it, FSDP2 gathers so): on
# dpsgs the aliased call, on gloo the same values in separate tensors
for dtype in (torch.float32, torch.bfloat16):
    seed += 1
    base = data((4, 3), dtype, seed)

    def gather_in_place(group, base=base):   # the input is this rank's block: MPI_IN_PLACE
        out = torch.zeros((n * 4, 3), dtype=base.dtype)
        mine = out.chunk(n)[r]
        mine.copy_(base)
        dist.all_gather_into_tensor(out, mine if group is DP else base.clone(), group=group)
        return out

    def gather_other_block(group, base=base):   # the input is another rank's block: a copy
        out = torch.zeros((n * 4, 3), dtype=base.dtype)
        theirs = out.chunk(n)[(r + 1) % n]
        theirs.copy_(base)
        dist.all_gather_into_tensor(out, theirs if group is DP else base.clone(), group=group)
        return out
    close(f"all_gather_into_tensor in place {dtype}", *both(gather_in_place))
    close(f"all_gather_into_tensor from another block {dtype}", *both(gather_other_block))

    whole = data((n * 6,), dtype, seed + 500)

    def rs_in_place(group, whole=whole):      # the output is this rank's chunk of the input
        buf = whole.clone()
        out = buf.chunk(n)[r] if group is DP else torch.empty(6, dtype=whole.dtype)
        dist.reduce_scatter_tensor(out, buf, group=group)
        return out.clone()
    got, ref = both(rs_in_place)
    close(f"reduce_scatter_tensor in place {dtype}", got, ref, rs_tolerance(whole, ref, R.SUM))

    def a2a_in_place(group, whole=whole):     # one tensor as input and output
        buf = whole.clone()
        out = buf if group is DP else torch.empty_like(buf)
        dist.all_to_all_single(out, buf, group=group)
        return out
    close(f"all_to_all_single in place {dtype}", *both(a2a_in_place))

# dtypes gloo cannot move: against what every rank knows each rank's input to be
for dtype in BYTES_ONLY:
    seed += 1
    mine = data((4, 3), dtype, seed)
    everyone = [data((4, 3), dtype, seed, rank=q) for q in range(n)]
    t = mine.clone()
    dist.broadcast(t, src=n - 1)
    close(f"broadcast {dtype}", t, everyone[-1])
    outs = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(outs, mine)
    close(f"all_gather {dtype}", torch.stack(outs), torch.stack(everyone))
    out = torch.empty((n, 3), dtype=dtype)
    dist.all_to_all_single(out, data((n, 3), dtype, seed + 1))
    close(f"all_to_all_single {dtype}", out, torch.stack([data((n, 3), dtype, seed + 1, rank=q)[r] for q in range(n)]))

# ---- tagged send/recv through batch_isend_irecv: two tags each way, received in the other order
for dtype in (torch.float32, torch.bfloat16, torch.int64):
    seed += 1
    a, b = data((33,), dtype, seed), data((5, 4), dtype, seed + 1)

    def exchange(group, a=a, b=b):
        nxt, prv = (r + 1) % n, (r - 1) % n
        ra, rb = torch.empty_like(a), torch.empty_like(b)
        ops = [dist.P2POp(dist.isend, a, nxt, group, tag=5), dist.P2POp(dist.isend, b, nxt, group, tag=9),
               dist.P2POp(dist.irecv, rb, prv, group, tag=9), dist.P2POp(dist.irecv, ra, prv, group, tag=5)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        return torch.cat([ra.reshape(-1), rb.reshape(-1)])
    close(f"batch_isend_irecv {dtype}", *both(exchange))
    if n >= 2:   # blocking send/recv between ranks 0 and 1 with a tag
        if r == 0:
            dist.send(a, 1, tag=77)
        elif r == 1:
            got = torch.empty_like(a)
            dist.recv(got, 0, tag=77)
            close(f"send/recv {dtype}", got, data((33,), dtype, seed, rank=0))

# ---- objects (all_gather / broadcast underneath), barrier
objs: list = [None] * n
dist.all_gather_object(objs, {"rank": r, "name": f"r{r}"})
close("all_gather_object", torch.tensor([o["rank"] for o in objs]), torch.arange(n))
box = [{"from": r}]
dist.broadcast_object_list(box, src=n - 1)
close("broadcast_object_list", torch.tensor(box[0]["from"]), torch.tensor(n - 1))
dist.barrier()
w = dist.barrier(async_op=True)
w.wait()

# ---- refusals: one clear error each
for name, call, kind, words in [
        ("recv from any source", lambda: dist.recv(torch.ones(2)), NotImplementedError,
         "recv from any source is not implemented"),
        ("AVG int", lambda: dist.all_reduce(torch.ones(2, dtype=torch.int64), op=R.AVG), ValueError,
         "AVG of torch.int64 is not defined"),
        ("BAND", lambda: dist.all_reduce(torch.ones(2, dtype=torch.int64), op=R.BAND), NotImplementedError,
         "reduce op"),
        ("int16 sum", lambda: dist.all_reduce(torch.ones(2, dtype=torch.int16)), ValueError,
         "cannot reduce torch.int16")]:
    cases += 1
    try:
        call()
        failures.append(f"{name}: no error")
    except kind as e:
        if words not in str(e):
            failures.append(f"{name}: message {str(e)!r} lacks {words!r}")

# ---- a new group of a subset: the last ranks (all but rank 0 from 3 ranks on), against gloo's
members = list(range(1, n)) if n >= 3 else [0, 1]
sub_dp = dist.new_group(members)
sub_gloo = dist.new_group(members, backend="gloo")
if r in members:
    assert sub_dp.size() == len(members) and type(sub_dp).__name__ == "DpsgsProcessGroup"
    seed += 1
    base = data((1001,), torch.float32, seed)

    def sub_ops(group, base=base):
        t = base.clone()
        dist.all_reduce(t, group=group)
        b = base.clone()
        dist.broadcast(b, src=members[-1], group=group)
        outs = [torch.empty_like(base) for _ in members]
        dist.all_gather(outs, base, group=group)
        return torch.cat([t, b, *outs])
    got, ref = sub_ops(sub_dp), sub_ops(sub_gloo)
    k = len(members)
    exact = torch.zeros((k + 1) * 1001, dtype=torch.float64)   # broadcast and all_gather
    tol = None if k == 2 else torch.cat([2 * (k - 1) * unit_roundoff(torch.float32) * abs_sum(base, sub_gloo), exact])
    close(f"new_group {members}", got, ref, tol)
else:
    assert sub_dp == dist.GroupMember.NON_GROUP_MEMBER

# ---- DeviceMesh (its dimensions are new_groups over the store), a functional collective by
# group name, and torch's store-based barrier over the MPI store
if n % 2 == 0:
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, n // 2), mesh_dim_names=("dp", "tp"))
    for dim in ("dp", "tp"):
        ranks = dist.get_process_group_ranks(mesh.get_group(dim))
        t = torch.tensor([float(r)])
        dist.all_reduce(t, group=mesh.get_group(dim))
        close(f"DeviceMesh {dim} {ranks}", t, torch.tensor([float(sum(ranks))]))
    got = funcol.all_reduce(torch.full((3,), float(r)), "sum", mesh.get_group("tp"))
    close("functional all_reduce on the tp dimension", funcol.wait_tensor(got),
          torch.full((3,), float(sum(dist.get_process_group_ranks(mesh.get_group("tp"))))))
from torch.distributed.distributed_c10d import _get_default_store, _store_based_barrier

_store_based_barrier(r, _get_default_store(), "dpsgs-test", n, timedelta(seconds=30))
cases += 1

# ---- every rank agrees on the verdict
flag = torch.tensor([len(failures)], dtype=torch.int64)
dist.all_reduce(flag, group=GLOO)
for f in failures:
    print(f"rank {r}: FAIL {f}", flush=True)
dist.barrier()
if r == 0:
    print(f"OK {cases} cases" if int(flag) == 0 else f"FAILED on {int(flag)} case(s)", flush=True)
dist.destroy_process_group()
sys.exit(0 if int(flag) == 0 else 1)
