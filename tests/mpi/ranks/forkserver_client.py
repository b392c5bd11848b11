"""The rank's half of the test suite's fork server (tests/mpi/forkserver.py says why and
what differs from a cold start): called from sitecustomize at interpreter start-up, before
the program runs. It hands this process's command line, environment and descriptors to a
warm server, which forks the rank; this process then only forwards signals and exits as
the rank did. Any doubt (no server, an option it does not know) returns, and the program
starts cold, here, as usual.

Only stdlib modules that the interpreter has loaded already, or that load in milliseconds."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import sys

MAX_FDS = 256
FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
             signal.SIGALRM, signal.SIGTERM, signal.SIGCONT, signal.SIGTSTP, signal.SIGWINCH)


def send_message(sock: socket.socket, message: object, fds: list[int] = ()) -> None:
    payload = pickle.dumps(message)
    socket.send_fds(sock, [struct.pack("!I", len(payload))], list(fds))
    sock.sendall(payload)


def receive_message(sock: socket.socket) -> tuple[object, list[int]] | None:
    """One message and the descriptors that came with it; None at EOF."""
    header, fds, _, _ = socket.recv_fds(sock, 4, MAX_FDS)
    while header and len(header) < 4:
        more = sock.recv(4 - len(header))
        if not more:
            break
        header += more
    if len(header) < 4:
        return None
    size, = struct.unpack("!I", header)
    payload = b""
    while len(payload) < size:
        more = sock.recv(size - len(payload))
        if not more:
            return None
        payload += more
    return pickle.loads(payload), fds


def program(orig_argv: list[str]) -> tuple[str, str] | None:
    """(kind, target) of `python -m MOD`, `python -c CODE` or `python SCRIPT`; None for any
    interpreter option (those start cold)."""
    if len(orig_argv) < 2:
        return None
    first = orig_argv[1]
    if first in ("-m", "-c") and len(orig_argv) > 2:
        return ("module" if first == "-m" else "code"), orig_argv[2]
    if first.startswith("-"):
        return None
    return "script", os.path.abspath(first)


def open_fds(skip: int) -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd == skip:
            continue
        try:
            os.fstat(fd)                             # the listing's own descriptor is gone
        except OSError:
            continue
        fds.append(fd)
    return sorted(fds)


def hand_over() -> None:
    """Run this MPI rank in a child of the fork server and exit as it did; return at once
    where there is no server or the program must start cold."""
    servers = os.environ.get("DPSGS_TEST_FORKSERVER", "")
    if servers in ("", "0") or "PMI_RANK" not in os.environ:
        return
    task = program(sys.orig_argv)
    if task is None:
        return
    paths = servers.split(os.pathsep)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(paths[int(os.environ["PMI_RANK"]) % len(paths)])
    except OSError:                                  # not up yet, or gone: start cold
        sock.close()
        return
    fds = open_fds(sock.fileno())
    request = {
        "task": task, "argv": list(sys.argv), "orig_argv": list(sys.orig_argv),
        "executable": sys.executable, "flags": tuple(sys.flags), "path": list(sys.path),
        "env": dict(os.environ), "cwd": os.getcwd(), "umask": _umask(),
        "affinity": os.sched_getaffinity(0), "priority": os.getpriority(os.PRIO_PROCESS, 0),
        "fds": fds, "inheritable": [os.get_inheritable(fd) for fd in fds],
        "ignored": [s for s in signal.valid_signals() if _ignored(s)],
        "blocked": signal.pthread_sigmask(signal.SIG_BLOCK, []),
    }
    child = None
    try:
        send_message(sock, request, fds)
        reply = receive_message(sock)
        if reply is None:
            raise ConnectionError("the fork server closed the connection")
        if reply[0][0] == "cold":
            sock.close()
            return                                   # the one way back: nothing was started
        child = reply[0][1]
        _let_go(fds)
        _wait_as(child, sock)
    except BaseException as e:                       # never run the program here as well
        if child is not None:
            _forward(child, signal.SIGKILL)
        os.write(2, f"forkserver_client: {e!r}; this rank ends\n".encode())
    os._exit(1)


def _wait_as(child: int, sock: socket.socket) -> None:
    """Forward signals to the child until it ends, then end as it did."""
    for signum in FORWARDED:
        if not _ignored(signum):
            signal.signal(signum, lambda s, _frame: _forward(child, s))
    reply = receive_message(sock)
    if reply is None:
        raise ConnectionError("the fork server went away")
    status = reply[0][1]
    if os.WIFSIGNALED(status):                       # die of the same signal, as the rank did
        signum = os.WTERMSIG(status)
        if signum not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)
    os._exit(os.waitstatus_to_exitcode(status))


def _let_go(fds: list[int]) -> None:
    """The child has the descriptors now: close this process's copies (stderr stays, for a
    last message), so that the child's exit closes PMI, stdin and stdout at once, as a cold
    rank's exit does — hydra reads those closings."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        if fd in (0, 1):
            os.dup2(devnull, fd)
        elif fd != 2:
            os.close(fd)
    os.close(devnull)


def _forward(child: int, signum: int) -> None:
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass


def _ignored(signum: int) -> bool:
    try:
        return signal.getsignal(signum) == signal.SIG_IGN
    except (OSError, ValueError):
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
