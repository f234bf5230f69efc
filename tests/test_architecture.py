"""The import direction of docs/architecture.md, read from the source with ``ast`` (imports inside functions too):
scripts -> study -> engine -> models, data -> utils. No module imports a script, not even another script."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from utils.general import ROOT

# package -> the packages it may import (besides itself and third-party modules)
ALLOWED = {
    "utils": set(),
    "models": {"utils"},
    "data": {"utils"},
    "engine": {"utils", "models", "data"},
    "study": {"utils", "models", "data", "engine"},
}
SCRIPT_MODULES = {"train", "val", "detect", "compare", "export", "hubconf"}
SCRIPT_FOLDERS = {"benchmarks", "scripts"}


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, dotted module, names taken from it) for every absolute import in the file, wherever it sits."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def project_files() -> list[Path]:
    skip = {"tests", "datasets", "runs", ".git"}
    return sorted(p for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts))


def is_script(module: str) -> bool:
    parts = module.split(".")
    return parts[0] in SCRIPT_MODULES and len(parts) == 1 or (parts[0] in SCRIPT_FOLDERS and len(parts) > 1)


def violations(path: Path, root: Path = ROOT) -> list[str]:
    """One message per forbidden import of ``path`` (its layer is its top folder under ``root``)."""
    rel = path.relative_to(root)
    layer = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    bad = []
    for line, mod, names in imported_modules(path):
        top = mod.split(".")[0]
        where = f"{rel}:{line} imports {mod}"
        if is_script(mod) or any(is_script(f"{mod}.{n}") for n in names):  # `from benchmarks import x` too
            bad.append(f"{where} (a script)")
        elif layer in ALLOWED and top in ALLOWED and top != layer and top not in ALLOWED[layer]:
            allowed = sorted(ALLOWED[layer])
            bad.append(f"{where} ({layer} may import {'only ' + str(allowed) if allowed else 'none of the packages'})")
    return bad


def test_every_package_is_checked() -> None:
    folders = {p.relative_to(ROOT).parts[0] for p in project_files() if len(p.relative_to(ROOT).parts) > 1}
    assert folders == set(ALLOWED) | SCRIPT_FOLDERS  # a new top-level package needs a place in ALLOWED
    assert {p.stem for p in ROOT.glob("*.py")} == SCRIPT_MODULES


def test_imports_point_down_and_never_at_a_script() -> None:
    found = [v for p in project_files() for v in violations(p)]
    assert found == [], "\n".join(found)
    assert sum(len(imported_modules(p)) for p in project_files()) > 100  # the walk really read the imports


@pytest.mark.parametrize("layer, source, message", [
    ("utils", "from models.yolo import Model\n", "utils may import none of the packages"),
    ("data", "def f():\n    from engine.fit import fit\n", "data may import only ['utils']"),
    ("engine", "import study.runner\n", "engine may import only"),
    ("study", "def f():\n    import train\n", "(a script)"),
    ("benchmarks", "from benchmarks import norm_layers\n", "(a script)"),
])
def test_the_check_catches_upward_and_script_imports(tmp_path: Path, layer: str, source: str, message: str) -> None:
    fake_root = tmp_path / "repo"
    (fake_root / layer).mkdir(parents=True)
    f = fake_root / layer / "mod.py"
    f.write_text(source)
    found = violations(f, fake_root)
    assert len(found) == 1 and message in found[0] and found[0].startswith(f"{layer}/mod.py:")

