"""First-build time of the fused CPU kernels (models/csrc), each into an empty extension folder.

    python benchmarks/kernel_build.py                                   # both kernels of this checkout
    python benchmarks/kernel_build.py --sources /tmp/old_train.cpp     # any version of a source, e.g. from git show

Builds each source with the flags models/norm_act_cpu.py uses, in a fresh temporary build folder (so nothing
is cached), and prints the wall time of the build and import. The compile is one translation unit, so it
uses one core.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", nargs="+", default=[str(ROOT / "models/csrc/norm_act_train_cpu.cpp"),
                                                     str(ROOT / "models/csrc/norm_act_cpu.cpp")])
    opt = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from models.norm_act_cpu import CFLAGS, _import_cpp_extension_load

    load = _import_cpp_extension_load()
    for i, src in enumerate(opt.sources):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            load(f"normyolo_build_timing_{i}", [src], extra_cflags=CFLAGS, build_directory=d, verbose=False)
            print(f"{src}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
