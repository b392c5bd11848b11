"""The test suite's fork server: a warm Python that has imported torch once, and forks a
rank for each process that mpirun starts.

Why: a rank of this suite spends about 4 CPU-seconds importing torch and torch._dynamo
(which torch.optim imports on its first step) before it runs a line of its own; the suite
starts over 550 ranks on 2 cores, so that import was most of CI's time. Here it is paid
once per server.

How a rank uses it: mpirun starts `python ...` as usual; the interpreter loads
`tests/mpi/ranks/sitecustomize.py` (the launchers put that folder on PYTHONPATH), which
calls `forkserver_client.hand_over()`. That connects to a server (DPSGS_TEST_FORKSERVER),
sends its command line, environment, working folder, sys.path, signal dispositions and
every open file descriptor (stdio, hydra's PMI and control sockets); the server forks a
child that takes all of these over and runs the program exactly as `python` would (`-m`,
a script or `-c`), while the client waits, forwards signals to the child and exits as the
child did. What the rank runs is unchanged: real MPI, real PMI, its own process.

What differs from a cold start, and how it is held in check:
- torch, numpy and tqdm are already imported: the server refuses (the rank starts cold)
  when any variable these read at import time differs (OMP_*, TORCH*, LD_*, PYTHON*, ...),
  when the interpreter's flags differ, or when the command line has interpreter options;
- the parent process is the server, not hydra's proxy;
- ranks forked from one server share its str-hash seed, so several servers run and rank r
  uses server r mod count: neighbouring ranks of a job hash differently, as cold ranks do;
- numpy's global random state is reseeded in each child (Python's `random` reseeds
  itself at fork).
`DPSGS_TEST_FORKSERVER=0` runs every rank cold (tests/conftest.py).
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import socket
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "ranks"))
from forkserver_client import receive_message, send_message  # noqa: E402

PRELOAD = ("numpy", "torch", "torch._dynamo", "torch.fx", "torch.optim", "tqdm")
# variables read while PRELOAD imports (thread pools, allocators, torch's switches, locale,
# the interpreter's own); PYTHONPATH is not among them: sys.path is handed over
IMPORT_TIME = ("OMP_", "KMP_", "MKL_", "GOMP_", "OPENBLAS_", "TORCH", "PYTORCH_", "CUDA",
               "NVIDIA", "LD_", "MALLOC", "NUMEXPR", "TRITON", "PYTHON", "LC_", "LANG")


ENV_BEFORE_PRELOAD: dict[str, str] = {}
SET_BY_PRELOAD: dict[str, str] = {}     # e.g. TORCHINDUCTOR_CACHE_DIR, set by torch._dynamo


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME) and k != "PYTHONPATH"}


# -- the server ---------------------------------------------------------------------------------

def why_cold(request: dict) -> str | None:
    """Why this request must start cold (None: it may be forked from here)."""
    if request["flags"] != tuple(sys.flags):
        return "interpreter flags differ"
    if request["executable"] != sys.executable:
        return "another interpreter"
    # what the imports set themselves (as they would in the rank) counts as set on both sides
    theirs = import_time_env({**SET_BY_PRELOAD, **request["env"]})
    ours = import_time_env({**ENV_BEFORE_PRELOAD, **SET_BY_PRELOAD})
    if theirs != ours:
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        return "import-time variables differ: " + ", ".join(differ)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        return f"the server has {threads} threads; a fork would lose all but one"
    return None


def serve(listener: socket.socket) -> dict:
    """Answer rank requests until killed. Returns only in a forked child: its request.

    Each rank has two events: its child's exit (a pidfd) and its client's going away (EOF on
    the connection); both may come in one batch, so each handler looks at `job` first."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    sockets = [listener]

    def drop_client(job: dict) -> None:
        conn, job["conn"] = job["conn"], None
        selector.unregister(conn)
        sockets.remove(conn)
        conn.close()

    while True:
        for key, _ in selector.select():
            job = key.data
            try:
                if job is None:
                    conn, _ = listener.accept()
                    started = start_rank(conn, sockets, selector)
                    if isinstance(started, dict):
                        return started                   # the child
                elif key.fileobj == job["pidfd"]:        # the rank ended: tell its client
                    _, status = os.waitpid(job["pid"], 0)
                    selector.unregister(job["pidfd"])
                    os.close(job["pidfd"])
                    if job["conn"] is not None:
                        try:
                            send_message(job["conn"], ("exited", status))
                        except OSError:
                            pass
                        drop_client(job)
                elif job["conn"] is not None and not _recv_or_eof(job["conn"]):
                    try:                                 # the client went away: so does its rank
                        os.kill(job["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    drop_client(job)
            except Exception:                            # one rank's trouble is not the server's
                traceback.print_exc()


def _recv_or_eof(conn: socket.socket) -> bytes:
    try:
        return conn.recv(1)
    except OSError:
        return b""


def start_rank(conn: socket.socket, sockets: list[socket.socket],
               selector: selectors.BaseSelector) -> dict | None:
    """Read one request; fork its rank (returns the request in the child, None here) or
    answer "cold"."""
    received = receive_message(conn)
    if received is None:
        conn.close()
        return None
    request, fds = received
    reason = why_cold(request)
    if reason:
        print(f"cold: {reason}", file=sys.stderr, flush=True)
        for fd in fds:
            os.close(fd)
        try:
            send_message(conn, ("cold", reason))
        finally:
            conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            selector.close()
            for s in [*sockets, conn]:
                os.close(s.detach())          # detached: no socket object closes a reused fd
            become(request, fds)
        except BaseException:                 # never a second server: this child ends here
            traceback.print_exc()
            os._exit(70)
        return request
    for fd in fds:
        os.close(fd)
    print(f"warm: pid {pid}", file=sys.stderr, flush=True)
    job = {"pid": pid, "pidfd": os.pidfd_open(pid), "conn": conn}
    selector.register(job["pidfd"], selectors.EVENT_READ, job)
    selector.register(conn, selectors.EVENT_READ, job)
    sockets.append(conn)
    send_message(conn, ("started", pid))      # if the client is gone, its EOF ends the rank
    return None


def become(request: dict, received: list[int]) -> None:
    """In the forked child: take over the client's descriptors, signals, environment,
    folder and sys.path, so that what runs next sees the process the client was."""
    wanted = request["fds"]
    # move what arrived above every number in use, then into place, then close the rest
    floor = max([*wanted, *received, 2]) + 1
    lifted = []
    for fd in received:
        lifted.append(fcntl.fcntl(fd, fcntl.F_DUPFD, floor))
        os.close(fd)
    for number, fd, inheritable in zip(wanted, lifted, request["inheritable"]):
        os.dup2(fd, number, inheritable=inheritable)
    keep = set(wanted)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        handler = signal.SIG_IGN if signum in request["ignored"] else (
            signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        try:
            signal.signal(signum, handler)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, request["blocked"])
    os.environ.clear()
    os.environ.update(SET_BY_PRELOAD)                # as the rank's own imports would have
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    try:                                             # scheduling only: not worth a failure
        os.sched_setaffinity(0, request["affinity"])
        os.setpriority(os.PRIO_PROCESS, 0, request["priority"])
    except OSError:
        pass
    sys.argv[:] = request["argv"]
    sys.orig_argv[:] = request["orig_argv"]
    sys.path[:] = request["path"]
    if not sys.flags.safe_path:                      # what python prepends after site, as it does
        kind, target = request["task"]
        sys.path.insert(0, {"script": os.path.dirname(os.path.realpath(target)),
                            "module": os.getcwd(), "code": ""}[kind])
    # a cold rank draws its own seeds (Python's `random` reseeds itself at fork)
    import numpy.random
    import torch
    numpy.random.seed()
    torch.seed()


def run_as_main(request: dict) -> None:
    """Run the request's program as `python` runs it (`-m`, `-c` or a script). Errors and
    SystemExit go up to the interpreter, which reports and exits as for any program."""
    import builtins
    import importlib.machinery
    import runpy
    import types

    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    kind, target = request["task"]
    if kind == "module":
        runpy._run_module_as_main(target)            # what `python -m` itself calls
        return
    if kind == "code":
        main.__loader__ = importlib.machinery.BuiltinImporter
        exec(compile(target, "<string>", "exec"), main.__dict__)
        return
    main.__file__ = target
    main.__cached__ = None
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", target)
    with open(target, "rb") as f:
        code = compile(f.read(), target, "exec")
    exec(code, main.__dict__)


def main() -> dict:
    global ENV_BEFORE_PRELOAD, SET_BY_PRELOAD
    path = sys.argv[1]
    ENV_BEFORE_PRELOAD = dict(os.environ)
    for name in PRELOAD:
        __import__(name)
    SET_BY_PRELOAD = {k: v for k, v in os.environ.items() if k not in ENV_BEFORE_PRELOAD}
    try:                                             # die with the test session
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    listener.listen(128)
    os.rename(path + ".tmp", path)                   # clients find it only once it listens
    print(f"ready: {path}", file=sys.stderr, flush=True)
    return serve(listener)


if __name__ == "__main__":
    run_as_main(main())
