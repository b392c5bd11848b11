"""Point-to-point: ping-pong latency (OSU osu_latency) and windowed bandwidth (OSU osu_bw),
dpsgs Channel against raw mpi4py Isend/Irecv, between ranks 0 and 1, same run, same buffers.

Latency: rank 0 sends `size` bytes, rank 1 answers with `size` bytes; one-way latency =
round trip / 2, timed per round trip on rank 0. Bandwidth: rank 0 issues a window of W
messages back to back, rank 1 receives them and answers with a 1-byte ack (the same raw
mpi4py ack for both sides); MB/s = W * size / window time (1 MB = 1e6 B). The window is
64 messages (OSU) but at most `window_bytes` in total, and never below 2, so large messages
stay cheap; dpsgs' own bound of two sends in flight applies inside the window.
With --tensors T, each dpsgs message carries the size as T tensors (what a stage cut with
skip connections sends), against the same raw one-buffer messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from .harness import MIB, BenchContext, Timing, count_wrong, iters_for, pattern, ratio, \
    time_iterations

__all__ = ["joined", "run", "split", "window_for"]

TAG_DATA = 11
TAG_ACK = 12
CHANNEL_TAG = 101  # dpsgs channel r -> peer uses tag CHANNEL_TAG + r


def split(buf: np.ndarray, tensors: int) -> list[np.ndarray]:
    """A channel message of `tensors` consecutive views of buf (sizes differ by the remainder)."""
    step = len(buf) // tensors
    return [buf[i * step:(i + 1) * step if i + 1 < tensors else len(buf)] for i in range(tensors)]


def joined(message: list[np.ndarray]) -> np.ndarray:
    """The received message's bytes in order, for the verification."""
    return np.concatenate([np.asarray(a) for a in message])


def window_for(nbytes: int, window: int, window_bytes: int) -> int:
    """Messages per window: `window`, capped so a window holds <= window_bytes, >= 2."""
    return max(2, min(window, window_bytes // max(nbytes, 1)))


class _Pair:
    """Ranks 0 and 1: a raw sub-communicator and, with dpsgs, one channel each way."""

    def __init__(self, ctx: BenchContext) -> None:
        self.rank = ctx.rank
        self.peer = 1 - ctx.rank
        self.comm = ctx.comm.Split(0, ctx.rank)
        self.out = self.inp = None
        if ctx.dp is not None:
            from dpsgs import _C
            self.out = _C.Channel(ctx.dp, self.peer, CHANNEL_TAG + self.rank, True,
                                  f"bench p2p {self.rank}->{self.peer}")
            self.inp = _C.Channel(ctx.dp, self.peer, CHANNEL_TAG + self.peer, False,
                                  f"bench p2p {self.peer}->{self.rank}")
        self.ack = np.zeros(1, dtype=np.uint8)

    # --- raw mpi4py -------------------------------------------------------------------
    def raw_pingpong(self, sbuf: np.ndarray, rbuf: np.ndarray) -> Callable[[], None]:
        comm, peer = self.comm, self.peer
        if self.rank == 0:
            def body() -> None:
                # The receive is pre-posted, as the channel's slots are.
                r = comm.Irecv(rbuf, peer, TAG_DATA)
                s = comm.Isend(sbuf, peer, TAG_DATA)
                MPI.Request.Waitall([s, r])
        else:
            def body() -> None:
                comm.Irecv(rbuf, peer, TAG_DATA).Wait()
                comm.Isend(sbuf, peer, TAG_DATA).Wait()
        return body

    def raw_window(self, sbuf: np.ndarray, rbuf: np.ndarray, w: int) -> Callable[[], None]:
        comm, peer, ack = self.comm, self.peer, self.ack
        if self.rank == 0:
            def body() -> None:
                MPI.Request.Waitall([comm.Isend(sbuf, peer, TAG_DATA) for _ in range(w)])
                comm.Recv(ack, peer, TAG_ACK)
        else:
            def body() -> None:
                # One receive buffer for the whole window, as osu_bw does.
                MPI.Request.Waitall([comm.Irecv(rbuf, peer, TAG_DATA) for _ in range(w)])
                comm.Send(ack, peer, TAG_ACK)
        return body

    def raw_window_two(self, sbuf: np.ndarray, rbuf: np.ndarray, rbuf2: np.ndarray,
                       w: int) -> Callable[[], None]:
        """Raw MPI under the channel's own bound: at most two sends in flight, two receives
        pre-posted into two buffers and re-posted as each completes (double buffering)."""
        comm, peer, ack = self.comm, self.peer, self.ack
        if self.rank == 0:
            def body() -> None:
                pending: list[MPI.Request] = []
                for _ in range(w):
                    if len(pending) == 2:
                        pending.pop(0).Wait()
                    pending.append(comm.Isend(sbuf, peer, TAG_DATA))
                MPI.Request.Waitall(pending)
                comm.Recv(ack, peer, TAG_ACK)
        else:
            bufs = (rbuf, rbuf2)

            def body() -> None:
                posted = [comm.Irecv(bufs[i], peer, TAG_DATA) for i in range(min(2, w))]
                for i in range(w):
                    posted[i % 2].Wait()
                    if i + 2 < w:
                        posted[i % 2] = comm.Irecv(bufs[i % 2], peer, TAG_DATA)
                comm.Send(ack, peer, TAG_ACK)
        return body

    # --- dpsgs Channel ------------------------------------------------------------------
    def dp_pingpong(self, sbuf: np.ndarray, tensors: int) -> Callable[[], None]:
        out, inp, msg = self.out, self.inp, split(sbuf, tensors)
        if self.rank == 0:
            def body() -> None:
                work = out.send(msg)
                inp.recv()
                work.wait()
        else:
            def body() -> None:
                inp.recv()
                out.send(msg).wait()
        return body

    def dp_window(self, sbuf: np.ndarray, w: int, tensors: int) -> Callable[[], None]:
        out, inp, comm, peer, ack = self.out, self.inp, self.comm, self.peer, self.ack
        msg = split(sbuf, tensors)
        if self.rank == 0:
            def body() -> None:
                works = [out.send(msg) for _ in range(w)]
                for work in works:
                    work.wait()
                comm.Recv(ack, peer, TAG_ACK)
        else:
            def body() -> None:
                for _ in range(w):
                    inp.recv()
                comm.Send(ack, peer, TAG_ACK)
        return body

    # --- verification -------------------------------------------------------------------
    def verify(self, nbytes: int, dpsgs: bool, tensors: int) -> int:
        """Three ordered messages 0 -> 1 with distinct patterns, one back 1 -> 0; returns
        the wrong bytes summed over both ranks (untimed)."""
        wrong = 0
        salts_fwd, salt_back = (1, 2, 3), 4
        if self.rank == 0:
            msgs = [pattern(nbytes, np.uint8, s) for s in salts_fwd]
            back = pattern(nbytes, np.uint8, salt_back)
            if dpsgs:
                works = [self.out.send(split(m, tensors)) for m in msgs]
                wrong += count_wrong(joined(self.inp.recv()), back)
                for work in works:
                    work.wait()
            else:
                reqs = [self.comm.Isend(m, self.peer, TAG_DATA) for m in msgs]
                got = np.zeros(nbytes, dtype=np.uint8)
                self.comm.Recv(got, self.peer, TAG_DATA)
                MPI.Request.Waitall(reqs)
                wrong += count_wrong(got, back)
        else:
            for s in salts_fwd:
                if dpsgs:
                    got = joined(self.inp.recv())
                else:
                    got = np.zeros(nbytes, dtype=np.uint8)
                    self.comm.Recv(got, self.peer, TAG_DATA)
                wrong += count_wrong(got, pattern(nbytes, np.uint8, s))
            reply = pattern(nbytes, np.uint8, salt_back)
            if dpsgs:
                self.out.send(split(reply, tensors)).wait()
            else:
                self.comm.Send(reply, self.peer, TAG_DATA)
        return int(self.comm.allreduce(wrong, op=MPI.SUM))


def _halve(t: Timing) -> Timing:
    return Timing([s / 2 for s in t.samples])


def _side(t: Timing, wrong: int | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**t.to_dict(), "wrong": wrong, **(extra or {})}


def run(ctx: BenchContext, sizes: list[int], window: int = 64,
        window_bytes: int = 128 * MIB, tensors: int = 1) -> dict[str, Any]:
    """Latency and bandwidth rows for every size (complete on ranks 0 and 1; ranks >= 2
    only wait). For each size the raw side runs first, then dpsgs, on the same buffers;
    dpsgs sends each message as `tensors` tensors (the size split evenly, the last one
    taking the remainder), raw MPI as one buffer."""
    result: dict[str, Any] = {"latency": [], "bandwidth": [], "ranks": [0, 1], "tensors": tensors}
    if ctx.size < 2:
        result["note"] = "needs >= 2 ranks"
        return result
    if ctx.rank >= 2:
        ctx.comm.Split(MPI.UNDEFINED, ctx.rank)  # Split is collective over all ranks
        ctx.comm.Barrier()
        return result
    pair = _Pair(ctx)
    sides = ["raw", "raw2"] + (["dpsgs"] if ctx.dp is not None else [])
    for nbytes in sizes:
        iters = iters_for(nbytes, ctx.iters)
        w = window_for(nbytes, window, window_bytes)
        sbuf = pattern(nbytes, np.uint8, ctx.rank)
        rbuf = np.zeros(nbytes, dtype=np.uint8)
        rbuf2 = np.zeros(nbytes, dtype=np.uint8)
        lat: dict[str, Any] = {"size": nbytes, "iters": iters}
        bw: dict[str, Any] = {"size": nbytes, "iters": ctx.iters, "window": w}
        for side in sides:
            dp = side == "dpsgs"
            wrong = pair.verify(nbytes, dp, tensors) if ctx.check else None
            if side != "raw2":  # latency: one message in flight either way
                body = pair.dp_pingpong(sbuf, tensors) if dp else pair.raw_pingpong(sbuf, rbuf)
                pair.comm.Barrier()
                t = _halve(time_iterations(body, iters, ctx.warmup, pair.comm, barrier=False,
                                           combine="root"))
                lat[side] = _side(t, wrong)
            if dp:
                body = pair.dp_window(sbuf, w, tensors)
            elif side == "raw2":
                body = pair.raw_window_two(sbuf, rbuf, rbuf2, w)
            else:
                body = pair.raw_window(sbuf, rbuf, w)
            t = time_iterations(body, ctx.iters, ctx.warmup, pair.comm, combine="root")
            bw[side] = _side(t, wrong, {"mbps": w * nbytes / t.median / 1e6,
                                        "mbps_avg": w * nbytes / t.avg / 1e6})
        if ctx.dp is not None:
            lat["diff_us"] = lat["dpsgs"]["median_us"] - lat["raw"]["median_us"]
            lat["ratio"] = ratio(lat["dpsgs"]["median_us"], lat["raw"]["median_us"])
            bw["ratio"] = ratio(bw["dpsgs"]["mbps"], bw["raw"]["mbps"])
            bw["ratio_raw2"] = ratio(bw["dpsgs"]["mbps"], bw["raw2"]["mbps"])
        result["latency"].append(lat)
        result["bandwidth"].append(bw)
    pair.comm.Free()
    ctx.comm.Barrier()
    return result
