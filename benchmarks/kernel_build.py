"""First-build time of the fused CPU kernels (models/csrc), each into an empty folder.

    python benchmarks/kernel_build.py                                   # both kernels of this checkout
    python benchmarks/kernel_build.py --via torch --sources /tmp/old_train.cpp   # a source from before 2026-12-02's
                                                                        # C interface (git show), by cpp_extension

``--via cxx`` (default) compiles each source as models/cpu_build.py does (the system compiler, no torch header) and
loads it with ctypes; ``--via torch`` builds it with torch.utils.cpp_extension.load and the same optimisation flags,
as the kernels were built before they had a C interface (those sources include ATen's and pybind11's headers).
Prints the wall time of build + load per source. One translation unit each, so one core.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"]  # what cpp_extension builds were given


def build_torch(src: str, i: int, folder: str) -> None:
    """Build ``src`` as a torch C++ extension in ``folder`` (cpp_extension's CUDA_HOME notice silenced)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load

    load(f"normyolo_build_timing_{i}", [src], extra_cflags=TORCH_FLAGS, build_directory=folder, verbose=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", nargs="+", default=[str(ROOT / "models/csrc/norm_act_train_cpu.cpp"),
                                                     str(ROOT / "models/csrc/norm_act_cpu.cpp")])
    p.add_argument("--via", choices=("cxx", "torch"), default="cxx",
                   help="cxx: models/cpu_build.py's compile (default); torch: torch.utils.cpp_extension.load")
    opt = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from models.cpu_build import compile_library

    for i, src in enumerate(opt.sources):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            if opt.via == "torch":
                build_torch(src, i, d)
            else:
                out = Path(d) / f"timing_{i}.so"
                compile_library(Path(src), out)
                ctypes.CDLL(str(out))
            print(f"{src}: {time.perf_counter() - t0:.1f} s ({opt.via})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
