"""Build dpsgs._C: the MPI core always; the CUDA/NCCL backend when CUDA and NCCL are found.

    pip install .                                   # a wheel with every sub-package
    python setup.py build_ext --inplace             # development (scripts/setup.sh)
    DPSGS_CUDA=0|1|sim|auto ...                     # CPU/MPI only | NCCL backend required |
                                                    # the NCCL backend on the CPU simulator |
                                                    # real where CUDA, NCCL and a driver are, else sim
    DPSGS_BUILD_EXT=0 pip install -e .              # the package alone (scripts/setup.sh's editable
                                                    # install; its build_ext --inplace compiles _C once)

MPI flags come from `mpicc` (the one beside the running Python, i.e. the `mpich` wheel, else
PATH; `MPICC` overrides). The extension needs libmpi.so.12 (the MPICH ABI) at run time and
finds it as mpi4py does: it is already loaded when dpsgs imports mpi4py first (dpsgs._C is
always imported after mpi4py.MPI), else through an rpath to the installed environment's
lib/ (where the `mpich` wheel puts it) and to mpicc's lib/ unless that is pip's temporary
build environment (deleted after the build). dpsgs._C checks at import that it and mpi4py
use the same MPI library. CUDA comes from CUDA_HOME (or /usr/local/cuda), NCCL from NCCL_HOME
or the `nvidia-nccl-cu12` wheel. NCCL and CUDA streams are host APIs: g++ plus -lcudart and
libnccl is enough, no nvcc.

DPSGS_CUDA=sim compiles the same csrc/cuda/ against the CPU stand-ins of csrc/sim/ (a
simulated CUDA runtime and NCCL, csrc/sim/sim.h), so the GPU code path runs in CI; such a
build says so in build_info() ("cuda_simulated") and `--device auto` never picks it. The
default (auto) builds it wherever the real backend cannot run: no CUDA headers, no NCCL, or
no NVIDIA driver on the build machine.

The module exports only PyInit__C (csrc/bindings/exports.map), whatever the toolchain: some
compilers (module-built GCCs on clusters) link libstdc++ statically, and an extension that
exported those copies would hand them to torch when it is imported next.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _mpicc() -> str:
    explicit = os.environ.get("MPICC")
    if explicit:
        return explicit
    beside_python = Path(sys.executable).parent / "mpicc"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("mpicc")
    if not found:
        sys.exit("dpsgs build: no mpicc found. Install MPI first: pip install mpich mpi4py")
    return found


def _temporary(path: str) -> bool:
    """A directory of pip's isolated build environment (gone once the build is over)."""
    return "pip-build-env" in path or "build-env-" in Path(path).parent.name


def mpi_flags() -> dict[str, list[str]]:
    """Split `mpicc -show` into include dirs, library dirs, libraries and link args; rpaths
    only to directories that outlive the build (see the module docstring)."""
    words = shlex.split(subprocess.check_output([_mpicc(), "-show"], text=True))[1:]
    # installed: <env>/lib/pythonX.Y/site-packages/dpsgs/_C.so -> <env>/lib holds libmpi
    flags: dict[str, list[str]] = {"include_dirs": [], "library_dirs": [], "libraries": [],
                                   "extra_link_args": ["-Wl,-rpath,$ORIGIN/../../.."]}
    skip_next = False
    for i, w in enumerate(words):
        if skip_next:
            skip_next = False
            continue
        if w.startswith("-I"):
            flags["include_dirs"].append(w[2:])
        elif w.startswith("-L"):
            flags["library_dirs"].append(w[2:])
            if not _temporary(w[2:]):
                flags["extra_link_args"].append(f"-Wl,-rpath,{w[2:]}")
        elif w.startswith("-l"):
            flags["libraries"].append(w[2:])
        elif w == "-Wl,-rpath" and i + 1 < len(words):   # mpicc's own rpath: keep if it lasts
            target = words[i + 1].removeprefix("-Wl,")
            skip_next = True
            if not _temporary(target):
                flags["extra_link_args"].append(f"-Wl,-rpath,{target}")
        elif w.startswith("-Wl"):
            flags["extra_link_args"].append(w)
    return flags


def find_cuda() -> Path | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home)] if home else []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for c in candidates:
        if (c / "include" / "cuda_runtime.h").exists():
            return c
    return None


def find_nccl() -> tuple[Path, Path] | None:
    """(include dir, lib dir) of NCCL: NCCL_HOME, else the nvidia-nccl-cu12/cu13 wheel."""
    home = os.environ.get("NCCL_HOME")
    roots = [Path(home)] if home else []
    try:
        import nvidia.nccl  # type: ignore[import-not-found]

        roots += [Path(p) for p in nvidia.nccl.__path__]
    except ImportError:
        pass
    for r in roots:
        inc, lib = r / "include", r / "lib"
        if (inc / "nccl.h").exists() and glob.glob(str(lib / "libnccl.so*")):
            return inc, lib
    return None


def nvidia_driver_present() -> bool:
    """An NVIDIA driver on this machine: without one the real backend cannot run here."""
    if Path("/proc/driver/nvidia/version").exists():
        return True
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def sim_options() -> dict[str, list[str]]:
    """The NCCL backend compiled against the CPU stand-ins of csrc/sim/."""
    print("dpsgs build: NCCL backend ON, SIMULATED on the CPU (csrc/sim; DPSGS_CUDA=sim)", file=sys.stderr)
    return {
        "sources": sorted(glob.glob("csrc/cuda/*.cc") + glob.glob("csrc/sim/*.cc")),
        "include_dirs": ["csrc/sim/include"],
        "library_dirs": [],
        "libraries": [],
        "extra_link_args": [],
        "define_macros": [("DPSGS_WITH_NCCL", "1"), ("DPSGS_CUDA_SIM", "1")],
    }


def cuda_options() -> dict[str, list[str]] | None:
    """Compile options for the NCCL backend, None to skip it; DPSGS_CUDA=1 makes absence
    fatal, DPSGS_CUDA=sim asks for the simulator, auto falls back to it."""
    mode = os.environ.get("DPSGS_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return None
    if mode == "sim":
        return sim_options()
    if mode not in ("auto", "1", "on", "true", "yes"):
        sys.exit(f"dpsgs build: DPSGS_CUDA={mode!r}: expected 0, 1, sim or auto")
    cuda, nccl = find_cuda(), find_nccl()
    if cuda is None or nccl is None or (mode == "auto" and not nvidia_driver_present()):
        missing = "CUDA headers (set CUDA_HOME)" if cuda is None else \
            "NCCL (pip install nvidia-nccl-cu12, or set NCCL_HOME)" if nccl is None else "an NVIDIA driver"
        if mode in ("1", "on", "true", "yes"):
            sys.exit(f"dpsgs build: DPSGS_CUDA=1 but {missing} not found")
        print(f"dpsgs build: {missing} not found; building the NCCL backend on the CPU simulator",
              file=sys.stderr)
        return sim_options()
    nccl_inc, nccl_lib = nccl
    cuda_lib = next(p for p in (cuda / "lib64", cuda / "lib", cuda / "targets/x86_64-linux/lib")
                    if p.exists())
    # The wheel ships only the versioned libnccl.so.2: link it by file name, find it by rpath.
    nccl_link = "-l:libnccl.so.2" if not (nccl_lib / "libnccl.so").exists() else "-lnccl"
    print(f"dpsgs build: NCCL backend ON (CUDA {cuda}, NCCL {nccl_lib})", file=sys.stderr)
    return {
        "sources": sorted(glob.glob("csrc/cuda/*.cc")),
        "include_dirs": [str(cuda / "include"), str(nccl_inc)],
        "library_dirs": [str(cuda_lib), str(nccl_lib)],
        "libraries": ["cudart"],
        "extra_link_args": [nccl_link, f"-Wl,-rpath,{cuda_lib}", f"-Wl,-rpath,{nccl_lib}"],
        "define_macros": [("DPSGS_WITH_NCCL", "1")],
    }


EXPORTS_MAP = ROOT / "csrc" / "bindings" / "exports.map"


def get_extensions():
    import mpi4py
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension

    ParallelCompile("DPSGS_BUILD_JOBS", default=0).install()   # every core unless told

    sources = sorted(glob.glob("csrc/*.cc") + glob.glob("csrc/common/*.cc")
                     + glob.glob("csrc/bindings/*.cc"))
    mpi = mpi_flags()
    opts: dict[str, list] = {
        "include_dirs": ["csrc", mpi4py.get_include(), *mpi["include_dirs"]],
        "library_dirs": mpi["library_dirs"],
        "libraries": mpi["libraries"],
        "extra_link_args": [*mpi["extra_link_args"], f"-Wl,--version-script={EXPORTS_MAP}",
                            "-Wl,--exclude-libs,ALL"],
        "define_macros": [],
    }
    cuda = cuda_options()
    if cuda:
        sources += cuda.pop("sources")
        for key, values in cuda.items():
            opts[key] = opts[key] + values
    ext = Pybind11Extension(
        "dpsgs._C",
        sources,
        cxx_std=17,
        extra_compile_args=["-O3", "-march=x86-64-v2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        **opts,
    )
    return [ext]


setup(
    name="dpsgs",
    version="0.1.0",
    description="Data-parallel, fully decoupled backpropagation with stale stochastic gradients",
    packages=find_packages(include=["dpsgs", "dpsgs.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "mpi4py>=4.0", "tqdm"],
    extras_require={"train": ["torch==2.13.0", "scikit-learn", "matplotlib"]},
    ext_modules=[] if os.environ.get("DPSGS_BUILD_EXT") == "0" else get_extensions(),
    zip_safe=False,
)
