"""Where a benchmark writes: a new run-specific name by default, never another run's results."""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["RUNS", "add_out_args", "claim_dir", "existing_error", "free_names", "out_folder",
           "resolve_out", "stamp", "write_new"]

# Default outputs go here (git-ignored, like the trainer's runs/<timestamp>); bench/results
# holds the published figures, written only when asked for by --out.
RUNS = Path("runs") / "bench"


def add_out_args(p: argparse.ArgumentParser, name: str, folder: bool,
                 force_example: str = "") -> None:
    """--out and --force of a benchmark writing runs/bench/NAME-...: one JSON file (`folder`
    False; '-' writes none) or a folder of JSON and PNG files."""
    if folder:
        p.add_argument("--out", help=f"folder for JSON and PNG (default: a new runs/bench/"
                                     f"{name}-<YYYYmmdd-HHMMSS>/); refused if it holds this "
                                     f"run's files already")
        force = "let --out overwrite existing results"
    else:
        p.add_argument("--out", default=None,
                       help=f"JSON output (default: a new runs/bench/{name}-<np>ranks-"
                            f"<YYYYmmdd-HHMMSS>.json); '-' for none; an existing file is refused")
        force = "let --out overwrite an existing file"
    p.add_argument("--force", action="store_true",
                   help=f"{force} ({force_example})" if force_example else force)


def stamp() -> str:
    """The run's start time as it appears in default names: YYYYmmdd-HHMMSS."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def free_names(path: Path) -> Iterator[Path]:
    """`path`, then path-2, path-3, ... (the number before the suffix)."""
    yield path
    n = 2
    while True:
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1


def claim_dir(path: Path) -> Path:
    """Create `path` (or the first free path-2, ...) and return it: created exclusively, so
    two runs started in the same second get two folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in free_names(path):
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def out_folder(out: str | None, prefix: str) -> Path:
    """The folder named by --out, else a new runs/bench/PREFIX-<YYYYmmdd-HHMMSS>/."""
    return Path(out) if out else claim_dir(RUNS / f"{prefix}-{stamp()}")


def write_new(path: Path, text: str) -> Path:
    """Write `text` to `path`, or to the first free path-2, ... if another run has taken the
    name meanwhile; never replaces a file. Returns the path written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        for p in free_names(path):
            try:
                os.link(tmp, p)         # atomic, and fails on an existing name (no clobber)
                return p
            except FileExistsError:
                continue
    finally:
        tmp.unlink()
    raise AssertionError("unreachable")


def existing_error(prog: str, paths: Iterable[Path], force: bool) -> str | None:
    """The one-line refusal when an explicitly named output already exists (None when none
    does, or with --force)."""
    taken = next((p for p in paths if p.exists()), None)
    if taken is None or force:
        return None
    return (f"{prog}: {taken} already exists (another run's results); pass another --out, "
            f"or --force to overwrite it")


def resolve_out(prog: str, out: str | None, force: bool,
                default: Path) -> tuple[str | None, str | None]:
    """(the JSON path to write, None for '-'; the one-line refusal, or None) of a one-file
    benchmark: `default` (a new run-specific name) when --out is not given, an explicitly
    named file refused when it exists, unless --force."""
    if out == "-":
        return None, None
    if out is None:
        return str(default), None
    return out, existing_error(prog, [Path(out)], force)
