"""The layout's rules, read from the code itself (docs/design.md "Layout").

* ``sinks/`` and ``encoders/`` import from the runtime (``streamer``) only its contracts and
  its settings: they are adapters and models, not part of the pipeline's control flow;
* the runtime (``streamer/``) imports neither ``training/`` nor ``devtools/``, except the
  command line (``streamer/cli.py``), the composition root that dispatches to them;
* no module reaches into another module's underscore names: a ``_name`` is used only in the
  file that defines it (``self._x`` inside a class is the class's own business);
* no two files share a name for different things (``__init__.py`` aside);
* no absolute path of a machine anywhere in the repository outside recorded benchmark results.
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streamer", "sinks", "encoders", "training", "devtools")
CODE = (*PACKAGES, "bench", "scripts")


def python_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if "node_modules" not in p.parts)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    out: list[tuple[str, list[str], int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this package
                pkg = here if path.name == "__init__.py" else here[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_sinks_and_encoders_use_only_the_runtimes_contracts_and_settings():
    allowed = ("streamer.contracts", "streamer.settings")
    bad = []
    for path in python_files("sinks", "encoders"):
        for module, names, line in imports(path):
            targets = [f"{module}.{n}" if module == "streamer" else module for n in (names or [""])]
            for target in targets:
                top = target.split(".")[0]
                if top == "streamer" and not target.startswith(allowed):
                    bad.append(f"{rel(path)}:{line} imports {target}")
                if top in ("training", "devtools"):
                    bad.append(f"{rel(path)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_runtime_imports_neither_training_nor_devtools():
    bad = [
        f"{rel(path)}:{line} imports {module}"
        for path in python_files("streamer")
        if path != ROOT / "streamer" / "cli.py"
        for module, _, line in imports(path)
        if module.split(".")[0] in ("training", "devtools")
    ]
    assert not bad, "\n".join(bad)


def _underscore_definitions() -> dict[str, set[str]]:
    """_name -> the files that define it (module-level names, classes, functions, methods and
    attributes assigned as ``self._x``)."""
    defined: dict[str, set[str]] = defaultdict(set)
    for path in python_files(*CODE):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.append(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.append(node.id)
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    defined[name].add(rel(path))
    return defined


def test_no_module_reaches_into_another_modules_underscore_names():
    defined = _underscore_definitions()
    bad = []
    for path in python_files(*CODE):
        here = rel(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (*PACKAGES, "bench"):
                bad += [
                    f"{here}:{node.lineno} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                files = defined.get(node.attr, set())
                if files and here not in files:
                    bad.append(f"{here}:{node.lineno} uses {ast.unparse(node)} (defined in {', '.join(sorted(files))})")
    assert not bad, "\n".join(bad)


def test_no_two_files_share_a_name_for_different_things():
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in python_files(*PACKAGES):
        if path.name != "__init__.py":
            by_name[path.name].append(rel(path))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, clashes


MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|Users|srv|mnt|scratch)/[A-Za-z0-9_.-]+")


def test_no_absolute_path_of_a_machine_in_the_repository():
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"git ls-files failed: {exc}")
    bad = []
    for name in files:
        if name.startswith("bench/results/"):  # recorded benchmark output: where it ran
            continue
        path = ROOT / name
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                bad.append(f"{name}:{i}: {line.strip()[:120]}")
    assert not bad, "use a setting (KGS_DATA_DIR, KGS_STATE_DIR) or a path relative to the project:\n" + "\n".join(bad)
