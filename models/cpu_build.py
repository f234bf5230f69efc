"""Build and load the fused CPU kernels of models/csrc with the system C++ compiler, once per machine.

The kernels are plain C++ behind a C interface, with no torch header: torch.utils.cpp_extension's build of the same
code spent about 21 s of a 2-core Xeon's time per kernel parsing ATen's and pybind11's headers (first use in a fresh
checkout, and every test session on CI), this one 1.5-2.1 s (``benchmarks/kernel_build.py``, back to back). The
compiler is ``$CXX``, else ``c++``; flags ``CFLAGS`` and the source's own ``SOURCE_FLAGS``. The library is cached as ``<dir>/normyolo_<source>_<hash>.so``
with ``<dir>`` = ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, and the hash covers what the machine
code depends on: the sources' text (the .cpp and the headers beside it), the compiler's version line, the flags and
the CPU's instruction-set flags (``-march=native``). Not the checkout's path: checkouts with the same sources share
one build. A build goes to a temporary file that is renamed into place, so processes that start together (DDP ranks,
compare.py's jobs) never load half a file; each may build, the last rename wins, and the files are identical.

The library is loaded with ctypes after torch, so its OpenMP calls bind to the runtime torch loaded (same soname,
libgomp.so.1): the kernels use torch's thread pool and its thread count, as ``at::parallel_for`` did. ``bind`` and
``call`` are how the kernels' Python wrappers (models/norm_act_cpu.py, models/norm_act_train.py, models/bn_act_train.py) reach its functions.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (loaded first: the kernels' OpenMP binds to torch's runtime)

from utils.general import LOGGER

CSRC = Path(__file__).resolve().parent / "csrc"
# -fno-trapping-math (as torch's own build): GCC otherwise keeps a float compare-and-select a branch, unvectorised
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-std=c++17", "-fPIC", "-shared"]
# per source: bn_act_train_cpu reproduces torch's roundings, so the compiler may fuse no multiply-add it did not ask for
SOURCE_FLAGS = {"bn_act_train_cpu": ["-ffp-contract=off"]}
PTR, I64, F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double  # the kernels' C argument types


def flags(source: Path) -> list[str]:
    """The compiler flags for ``source``: CFLAGS and its own (SOURCE_FLAGS)."""
    return [*CFLAGS, *SOURCE_FLAGS.get(source.stem, [])]


def cpu_flags() -> str:
    """The CPU's instruction-set flags (the build uses -march=native, so a cached build must match the CPU):
    /proc/cpuinfo's 'flags' (x86) or 'Features' (ARM) line, else the platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def compiler() -> str:
    """The C++ compiler command: ``$CXX`` (may carry a wrapper, e.g. ``ccache g++``), else ``c++``."""
    return os.environ.get("CXX") or "c++"


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    """First line of ``cxx --version``; RuntimeError naming the command if there is no such compiler."""
    argv = shlex.split(cxx)
    if not argv or shutil.which(argv[0]) is None:
        raise RuntimeError(f"no C++ compiler '{cxx}' on PATH (install g++ or set CXX)")
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else cxx


def _sources(source: Path) -> list[Path]:
    """``source`` and the headers beside it (what the build reads), in a fixed order."""
    return [source, *sorted(source.parent.glob("*.h"))]


def build_name(source: Path) -> str:
    """Library name of ``source``: one per (sources' text, compiler version, flags, CPU flags)."""
    h = hashlib.sha256()
    for f in _sources(source):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    cxx = compiler()
    h.update(f"{cxx}|{_compiler_version(cxx)}|{flags(source)}|{cpu_flags()}".encode())
    return f"normyolo_{source.stem}_{h.hexdigest()[:16]}"


def cache_dir() -> Path:
    """Where built libraries are kept: ``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``."""
    d = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(d) if d else Path.home() / ".cache" / "torch_extensions"


def compile_library(source: Path, out: Path) -> None:
    """Compile ``source`` into the shared library ``out`` (atomically: a temporary file renamed into place), with
    models/csrc (the kernels' header) on the include path. RuntimeError with the compiler's output if it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [*shlex.split(compiler()), *flags(source), f"-I{CSRC}", str(source), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr or r.stdout}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(source: Path, what: str = "kernel") -> ctypes.CDLL:
    """The kernel library built from ``source``, compiling it first if no cached build matches (logged, naming
    ``what``)."""
    path = cache_dir() / f"{build_name(source)}.so"
    if path.is_file():
        try:
            return ctypes.CDLL(str(path))
        except OSError as e:  # a damaged file (a crash mid-write on a filesystem that lost it): build it again
            LOGGER.warning(f"{source.stem}: cached build {path} does not load ({e}); rebuilding it")
    LOGGER.info(f"{source.stem}: building the {what} (first use with this compiler and CPU, a few seconds)")
    compile_library(source, path)
    return ctypes.CDLL(str(path))


def bind(fn: Any, *argtypes: Any) -> Any:
    """A C function of a kernel library with its argument types set (ctypes releases the GIL while it runs)."""
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def call(fn: Any, *args: Any) -> None:
    """Run a kernel entry point; MemoryError if it reports a failed allocation."""
    if fn(*args) != 0:
        raise MemoryError(f"{fn.__name__}: the kernel could not allocate its scratch memory")
