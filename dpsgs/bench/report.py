"""Side-by-side tables (dpsgs vs raw, ratio columns) and the summary lines of the comm bench."""

from __future__ import annotations

import statistics
from typing import Any

from .harness import MIB, Table, format_size

__all__ = ["print_tables", "summarize", "summary_lines"]

RAW_BASE = "mpi.Allreduce-inplace"  # same in-place semantics as Reducer.allreduce
DP_BASE = "dpsgs.auto"
AT = {"1M": MIB, "64M": 64 * MIB}


def _row_at(rows: list[dict[str, Any]], size: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["size"] == size), None)


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _latency(rows: list[dict[str, Any]]) -> str:
    t = Table("Point-to-point latency, ranks 0<->1 (OSU osu_latency: one-way = round trip/2)",
              [("size(B)", 10), ("med(us)", 9), ("avg(us)", 9), ("#wrong", 7),
               ("med(us)", 9), ("avg(us)", 9), ("#wrong", 7), ("diff(us)", 9), ("ratio", 7)],
              [("", 1), ("raw Isend/Irecv", 3), ("dpsgs Channel", 3), ("dpsgs vs raw", 2)])
    return t.render([[r["size"], *(_get(r, s, k) for s in ("raw", "dpsgs")
                                   for k in ("median_us", "avg_us", "wrong")),
                      r.get("diff_us"), r.get("ratio")] for r in rows])


def _bandwidth(rows: list[dict[str, Any]]) -> str:
    t = Table("Point-to-point bandwidth, rank 0 -> 1 (OSU osu_bw: window of sends + ack; "
              "MB/s = 1e6 B/s, from the median window time)",
              [("size(B)", 10), ("window", 6), ("MB/s", 9), ("avg MB/s", 9), ("#wrong", 7),
               ("MB/s", 9), ("#wrong", 7), ("MB/s", 9), ("avg MB/s", 9), ("#wrong", 7),
               ("vs raw", 7), ("vs raw2", 7)],
              [("", 2), ("raw Isend/Irecv", 3), ("raw2: <= 2 in flight", 2),
               ("dpsgs Channel", 3), ("ratio", 2)])
    return t.render([[r["size"], r["window"],
                      *(_get(r, "raw", k) for k in ("mbps", "mbps_avg", "wrong")),
                      *(_get(r, "raw2", k) for k in ("mbps", "wrong")),
                      *(_get(r, "dpsgs", k) for k in ("mbps", "mbps_avg", "wrong")),
                      r.get("ratio"), r.get("ratio_raw2")] for r in rows])


def _allreduce_family(rows: list[dict[str, Any]], title: str, names: list[str]) -> str:
    cols = [("size(B)", 10), ("count", 10), ("type", 8), ("redop", 5)]
    for _ in names:
        cols += [("time(us)", 9), ("algbw", 7), ("busbw", 7), ("#wrong", 6)]
    groups = [("", 4), *((n, 4) for n in names)]
    t = Table(title, cols, groups)
    return t.render([[r["size"], r["count"], r["type"], r["redop"],
                      *(_get(r, "variants", n, k) for n in names
                        for k in ("median_us", "algbw", "busbw", "wrong"))] for r in rows])


def _allreduce_compare(rows: list[dict[str, Any]]) -> str:
    t = Table("All-reduce busbw, dpsgs vs raw (GB/s); memcpy = single-threaded np.copyto "
              "of the same size on rank 0",
              [("size(B)", 10), ("MPI_Allr", 9), ("best raw", 9), ("dpsgs", 9),
               ("vs MPI", 7), ("vs best", 7), ("memcpy", 8), ("dpsgs", 7), ("MPI", 7)],
              [("", 1), ("busbw GB/s", 3), ("ratio", 2), ("GB/s", 1), ("/memcpy", 2)])
    out = []
    for r in rows:
        v, dp = r["variants"], r.get("dpsgs_base", DP_BASE)
        best = max(x["busbw"] for k, x in v.items() if k.startswith("mpi."))
        out.append([r["size"], _get(v, RAW_BASE, "busbw"), best, _get(v, dp, "busbw"),
                    r.get("ratio"), r.get("ratio_vs_best_raw"), _get(r, "memcpy", "gbps"),
                    _get(r, "busbw_over_memcpy", dp),
                    _get(r, "busbw_over_memcpy", RAW_BASE)])
    return t.render(out)


def _overlap(rows: list[dict[str, Any]]) -> str:
    dp_name = next((k for r in rows for k in r if k.startswith("dpsgs.")), "dpsgs.auto")
    what = ("fixed-work NumPy compute" if rows[0].get("compute") == "numpy"
            else "time.sleep as compute (core left free; diagnostic)")
    t = Table(f"Overlap of a non-blocking all-reduce with {what} (OSU: "
              "max(0, 100 - 100*(total - compute)/comm), at most 100)",
              [("size(B)", 10), *[(c, w) for _ in range(2) for c, w in
                                  (("comm(us)", 9), ("compute", 9), ("total", 9),
                                   ("overlap%", 8))], ("diff pts", 8)],
              [("", 1), ("raw Iallreduce+Wait", 4), (f"{dp_name} (progress thread)", 4),
               ("", 1)])
    out = []
    for r in rows:
        vals = [_get(r, s, k) for s in ("mpi.Iallreduce", dp_name)
                for k in ("comm_us", "compute_us", "total_us", "overlap_pct")]
        raw_pct, dp_pct = _get(r, "mpi.Iallreduce", "overlap_pct"), _get(r, dp_name,
                                                                          "overlap_pct")
        diff = None if raw_pct is None or dp_pct is None else dp_pct - raw_pct
        out.append([r["size"], *vals, diff])
    return t.render(out)


def print_tables(results: dict[str, Any], nranks: int, has_dp: bool) -> None:
    """Rank 0 prints every section that ran (N/A where a side was not measured)."""
    blocks = []
    p2p = results.get("p2p")
    if p2p and p2p["latency"]:
        blocks += [_latency(p2p["latency"]), _bandwidth(p2p["bandwidth"])]
    rows = results.get("allreduce")
    if rows:
        blocks.append(_allreduce_family(
            rows, f"All-reduce, raw mpi4py, {nranks} ranks (time = median us; GB/s; "
            "busbw = algbw*2(n-1)/n)",
            ["mpi.Allreduce", "mpi.Allreduce-inplace", "mpi.Iallreduce+Wait"]))
        if has_dp:
            names = [k for k in rows[0]["variants"] if k.startswith("dpsgs.")]
            blocks.append(_allreduce_family(
                rows, f"All-reduce, dpsgs Reducer (in place, sum), {nranks} ranks", names))
        blocks.append(_allreduce_compare(rows))
    if results.get("overlap"):
        blocks.append(_overlap(results["overlap"]))
    print("\n#\n".join(blocks), flush=True)


def summarize(results: dict[str, Any], nranks: int) -> dict[str, Any]:
    """The figures the issue asks for, keyed by size label, plus the total #wrong."""
    s: dict[str, Any] = {"nranks": nranks}
    p2p = results.get("p2p") or {"latency": [], "bandwidth": []}
    ar = results.get("allreduce") or []
    s["dpsgs_base"] = ar[0].get("dpsgs_base", DP_BASE) if ar else DP_BASE
    ov = results.get("overlap") or []
    lat8 = _row_at(p2p["latency"], 8)
    s["latency_8B_us"] = {"dpsgs": _get(lat8, "dpsgs", "median_us"),
                          "raw": _get(lat8, "raw", "median_us"), "diff": _get(lat8, "diff_us"),
                          "diff_best": _diff(_get(lat8, "dpsgs", "min_us"),
                                             _get(lat8, "raw", "min_us"))}
    # "best": from each side's fastest iteration, a steadier figure on a loaded machine.
    s["channel_bw_ratio_best"], s["allreduce_busbw_ratio_best"] = {}, {}
    s["channel_bw_mbps"], s["channel_bw_ratio"] = {}, {}
    s["allreduce_busbw_gbps"], s["allreduce_busbw_ratio"] = {}, {}
    s["memcpy_gbps"], s["busbw_over_memcpy"], s["overlap_pct"] = {}, {}, {}
    for label, size in AT.items():
        bw = _row_at(p2p["bandwidth"], size)
        s["channel_bw_mbps"][label] = {"dpsgs": _get(bw, "dpsgs", "mbps"),
                                       "raw": _get(bw, "raw", "mbps")}
        s["channel_bw_ratio"][label] = _get(bw, "ratio")
        s.setdefault("channel_bw_ratio_raw2", {})[label] = _get(bw, "ratio_raw2")
        s["channel_bw_ratio_best"][label] = _inv(_get(bw, "dpsgs", "min_us"),
                                                 _get(bw, "raw", "min_us"))
        r = _row_at(ar, size)
        s["allreduce_busbw_ratio_best"][label] = _inv(
            _get(r, "variants", s["dpsgs_base"], "min_us"),
            _get(r, "variants", RAW_BASE, "min_us"))
        s["allreduce_busbw_gbps"][label] = {k: x["busbw"] for k, x in
                                            (_get(r, "variants") or {}).items()}
        s["allreduce_busbw_ratio"][label] = _get(r, "ratio")
        s["memcpy_gbps"][label] = _get(r, "memcpy", "gbps")
        s["busbw_over_memcpy"][label] = _get(r, "busbw_over_memcpy")
        o = _row_at(ov, size) or {}
        s["overlap_pct"][label] = {k: x["overlap_pct"] for k, x in o.items()
                                   if isinstance(x, dict) and "overlap_pct" in x}
    ratios = [(r["ratio"], r["size"]) for r in ar if r.get("ratio") is not None]
    s["allreduce_min_ratio"] = ({"ratio": min(ratios)[0], "size": min(ratios)[1]}
                                if ratios else None)
    names = {k for r in ar for k in r["variants"]}
    s["avg_busbw_gbps"] = {k: statistics.fmean(r["variants"][k]["busbw"] for r in ar
                                               if k in r["variants"]) for k in sorted(names)}
    wrong = [x.get("wrong") for r in p2p["latency"] for x in (r.get("raw"), r.get("dpsgs")) if x]
    wrong += [x.get("wrong") for r in ar for x in r["variants"].values()]
    s["wrong"] = sum(w for w in wrong if w)
    return s


def _inv(t_dp: float | None, t_raw: float | None) -> float | None:
    """Throughput ratio dpsgs/raw from two times of the same amount of data."""
    return None if not t_dp or t_raw is None else t_raw / t_dp


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _f(v: float | None, fmt: str = ".1f", unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{unit}"


def summary_lines(s: dict[str, Any], nranks: int, args: Any, info: dict[str, Any]) -> list[str]:
    """nccl-tests-style footer ('# ...') with the headline ratios."""
    lat, dp_base = s["latency_8B_us"], s["dpsgs_base"]
    lines = ["#", f"# Summary: {nranks} ranks, {args.dtype}, medians of -n {args.iters} "
             f"(x up to 10 below 1 MiB) after -w {args.warmup}; load at start "
             f"{info.get('loadavg')} (shared machine: expect noise)"]
    for label in AT:
        ar = s["allreduce_busbw_gbps"][label]
        lines.append(
            f"#  all-reduce busbw @{label:>3}: {dp_base}/MPI_Allreduce = "
            f"{_x(s['allreduce_busbw_ratio'][label])} ({_f(ar.get(dp_base), '.2f')} vs "
            f"{_f(ar.get(RAW_BASE), '.2f')} GB/s; best iterations "
            f"{_x(s['allreduce_busbw_ratio_best'][label])}; target >= 3x from 16M, >= 1x "
            "everywhere)")
    for label in AT:
        bw = s["channel_bw_mbps"][label]
        lines.append(f"#  channel bandwidth @{label:>3}: dpsgs/raw = "
                     f"{_x(s['channel_bw_ratio'][label])} ({_f(bw['dpsgs'], '.0f')} vs "
                     f"{_f(bw['raw'], '.0f')} MB/s; best iterations "
                     f"{_x(s['channel_bw_ratio_best'][label])}; vs raw with the same "
                     f"<= 2 in flight {_x(s.get('channel_bw_ratio_raw2', {}).get(label))}; "
                     "target >= 0.97x from 1M)")
    lines.append(f"#  8-byte latency: dpsgs {_f(lat['dpsgs'], '.2f')} us, raw "
                 f"{_f(lat['raw'], '.2f')} us, difference {_f(lat['diff'], '+.2f')} us "
                 f"(best iterations {_f(lat['diff_best'], '+.2f')} us; target <= +5 us)")
    for label in AT:
        o = s["overlap_pct"][label]
        dp = next((v for k, v in o.items() if k.startswith("dpsgs.")), None)
        lines.append(f"#  overlap @{label:>3}: dpsgs Reducer {_f(dp, '.0f', ' %')}, raw "
                     f"Iallreduce {_f(o.get('mpi.Iallreduce'), '.0f', ' %')} (target >= 90 %)")
    for label in AT:
        frac = s["busbw_over_memcpy"][label] or {}
        lines.append(f"#  busbw / memcpy bandwidth @{label:>3}: dpsgs "
                     f"{_f(frac.get(dp_base), '.2f')}, MPI_Allreduce "
                     f"{_f(frac.get(RAW_BASE), '.2f')} (memcpy "
                     f"{_f(s['memcpy_gbps'][label], '.1f')} GB/s copied; STREAM counts 2x)")
    m = s["allreduce_min_ratio"]
    if m:
        lines.append(f"#  lowest all-reduce ratio dpsgs/MPI_Allreduce: {m['ratio']:.2f}x "
                     f"at size {format_size(m['size'])}")
    for k, v in s["avg_busbw_gbps"].items():
        lines.append(f"#  Avg bus bandwidth {k:<22}: {v:.3f} GB/s")
    lines.append(f"#  Out of bounds values : {s['wrong']} "
                 f"{'OK' if not s['wrong'] else 'FAILED'}"
                 f"{'' if args.check else ' (not checked: pass --check)'}")
    return lines
