"""models/cpu_build.py: compiling, caching and loading the fused CPU kernels; models/norm_act_cpu.py's fallback."""
from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest

import models.bn_act_train as bat
import models.cpu_build as cb
import models.norm_act_cpu as nac
import models.norm_act_train as nat
from logcapture import call_logged

needs_cxx = pytest.mark.skipif(shutil.which(cb.compiler()) is None, reason="no C++ compiler on PATH")


def _copy_sources(dst: Path, source: Path = nac.SOURCE) -> Path:
    """A kernel's source and the headers beside it, copied into ``dst``; the copied .cpp."""
    dst.mkdir(parents=True)
    for f in [source, *source.parent.glob("*.h")]:
        shutil.copy(f, dst / f.name)
    return dst / source.name


@needs_cxx
def test_build_name_follows_text_not_checkout(tmp_path):
    """Same sources at two paths (two checkouts) share one build; an edited .cpp or header gets a new one."""
    a, b = _copy_sources(tmp_path / "a"), _copy_sources(tmp_path / "b")
    name = cb.build_name(a)
    assert name.startswith("normyolo_norm_act_cpu_") and cb.build_name(b) == name
    a.write_text(a.read_text() + "\n// edited\n")
    assert cb.build_name(a) != name
    header = b.parent / "parallel_range.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert cb.build_name(b) not in (name, cb.build_name(a))


@needs_cxx
def test_a_sources_own_flags_are_used_and_hashed(tmp_path, monkeypatch):
    """bn_act_train_cpu builds with -ffp-contract=off (it reproduces torch's roundings); its flags are part of its
    build's name, so a change of them rebuilds it."""
    src = _copy_sources(tmp_path / "src", bat.SOURCE)
    assert cb.flags(src) == [*cb.CFLAGS, "-ffp-contract=off"] and cb.flags(nac.SOURCE) == cb.CFLAGS
    name = cb.build_name(src)
    monkeypatch.setitem(cb.SOURCE_FLAGS, src.stem, [])
    assert cb.build_name(src) != name


@needs_cxx
@pytest.mark.parametrize("source,entry", [(nac.SOURCE, "normyolo_group_norm_leaky"),
                                          (nat.SOURCE, "normyolo_norm_act_forward"),
                                          (bat.SOURCE, "normyolo_bn_act_forward")],
                         ids=["inference", "training", "bn-training"])
def test_builds_once_then_loads_the_cached_library(tmp_path, monkeypatch, source, entry):
    """Each kernel compiles (a compiler on PATH: a compile error fails here, it does not skip the kernel tests)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    src = _copy_sources(tmp_path / "src", source)
    calls = []
    real = cb.compile_library
    monkeypatch.setattr(cb, "compile_library", lambda s, o: (calls.append(o), real(s, o))[1])
    lib = cb.load_library(src)
    assert isinstance(lib, ctypes.CDLL) and hasattr(lib, entry)
    assert len(calls) == 1 and calls[0].parent == tmp_path / "cache" and calls[0].suffix == ".so"
    cb.load_library(src)
    assert len(calls) == 1  # cached
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [calls[0].name]  # no temporary left


@needs_cxx
def test_a_damaged_cached_library_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    src = _copy_sources(tmp_path / "src")
    path = tmp_path / f"{cb.build_name(src)}.so"
    path.write_bytes(b"")  # what a crash mid-write on a filesystem without the rename could leave
    lib, lines = call_logged(cb.load_library, src)
    assert hasattr(lib, "normyolo_group_norm_leaky") and path.stat().st_size > 0
    assert any("does not load" in ln and "rebuilding" in ln for ln in lines)


@needs_cxx
def test_compiler_command_may_carry_a_wrapper(tmp_path, monkeypatch):
    """CXX="env c++" (as "ccache g++" would be): split into words, not looked up as one file name."""
    monkeypatch.setenv("CXX", f"env {cb.compiler()}")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert hasattr(cb.load_library(_copy_sources(tmp_path / "src")), "normyolo_group_norm_leaky")


@needs_cxx
def test_failed_allocation_is_an_error_code_not_a_crash(monkeypatch):
    """An allocation that fails inside the kernels' OpenMP region (inference: per-thread scratch of 2**50 channels,
    two images on two threads) or before it (training) returns 1, which the wrappers raise as MemoryError."""
    kernel, train = nac.load_kernel(), nat.load_train_kernel()
    if kernel is None or train is None:
        pytest.skip("kernels disabled here (NORMYOLO_CPU_KERNELS=0)")
    huge = 2 ** 50
    assert kernel._fn(None, None, None, None, 2, huge, 1, 1, 1e-5, 0.1, 2) == 1
    assert train._fwd(None, None, None, 1, huge, 1, 1, 1e-3, 0.1, 2, *(None,) * 5) == 1
    bn = bat.load_bn_kernel()
    if bn is not None:  # None where it does not reproduce torch here (its own test says why)
        assert bn._fwd(None, None, None, 4, huge, 1e-3, 0.1, 0, None, None, 0.1, 1, 2, *(None,) * 5) == 1
    with pytest.raises(MemoryError, match="could not allocate"):
        cb.call(kernel._fn, None, None, None, None, 2, huge, 1, 1, 1e-5, 0.1, 2)


@needs_cxx
def test_compile_error_leaves_no_file_and_names_the_error(tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("extern \"C\" int f() { return undefined_name; }\n")
    out = tmp_path / "out" / "bad.so"
    with pytest.raises(RuntimeError, match="undefined_name"):
        cb.compile_library(bad, out)
    assert list(out.parent.iterdir()) == []


def test_build_failure_warns_once_and_falls_back(tmp_path, monkeypatch):
    """No compiler: one warning naming the reason, then torch's ops (None) on every later call."""
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("NORMYOLO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(nac, "_state", {})  # this process's loaded kernels, restored for the other tests
    (first, second), lines = call_logged(lambda: (nac.load_kernel(), nac.load_kernel()))
    assert first is None and second is None
    failed = [ln for ln in lines if "kernel build failed" in ln]
    assert len(failed) == 1 and "no C++ compiler 'no-such-compiler-xyz'" in failed[0]


def test_a_compile_error_is_one_warning_line(tmp_path, monkeypatch):
    """A compiler that fails: the warning carries the compiler's first 'error:' line, not the whole log."""
    def broken(source, out):
        raise RuntimeError("c++ -O3 x.cpp failed:\nx.cpp: In function 'f':\nx.cpp:3:5: error: 'omp.h' not found\n"
                           "compilation terminated.")

    monkeypatch.setattr(nac, "load_library", lambda source, what: (broken(source, None), None)[1])
    monkeypatch.delenv("NORMYOLO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(nac, "_state", {})
    kernel, lines = call_logged(nac.load_kernel)
    assert kernel is None
    failed = [ln for ln in lines if "kernel build failed" in ln]
    assert len(failed) == 1 and failed[0].endswith("(RuntimeError: x.cpp:3:5: error: 'omp.h' not found)")
