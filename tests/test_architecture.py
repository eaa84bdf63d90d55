"""The rooms stay apart and the code stays lint-clean: CI runs both checks through this file.

* ``lint-imports`` enforces the contracts in ``pyproject.toml`` (``app`` never imports ``worker`` or an
  ML framework, ``pipelines`` imports no web/database/queue code, the job contract and the client stay small);
* no import cycle between the project's modules (grimp's graph, function-local imports included);
* ``ruff check .`` with the project's rules;
* function-local imports of the project's own modules only where they defer the ML stack.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PACKAGES = ("app", "core", "worker", "pipelines", "likeness", "likeness_cli")


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    result = _run(str(BIN / "lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout)
    assert kept and int(kept.group(1)) >= 7, result.stdout


def test_app_has_no_import_of_worker_even_inside_functions():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in (ROOT / "app").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*(from|import)\s+worker\b", line)
    ]
    assert offenders == []


def test_no_module_imports_one_that_imports_it_back():
    """No import cycle between files, however long, function-local imports included: a cycle is a
    knot in the rooms that a lazy import only hides (import-linter's ``acyclic_siblings`` would also
    refuse cycles between packages whose files form none, so the graph is read here)."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    cycles = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                ring = (module, *back[:-1])
                start = ring.index(min(ring))
                cycles.add(" -> ".join(ring[start:] + ring[:start + 1]))
    assert sorted(cycles) == []


def test_ruff_finds_nothing():
    result = _run(sys.executable, "-m", "ruff", "check", ".", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


# ---- function-local imports --------------------------------------------------------------------------------

#: Libraries worth deferring: the ML stack (seconds to import, gigabytes of RAM on a GPU worker).
HEAVY = {"torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors", "mediapipe",
         "cv2", "dlib", "face_recognition", "spandrel", "ultralytics", "facexlib", "lpips", "bitsandbytes",
         "controlnet_aux", "skimage", "matplotlib"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules) -> list[str]:  # noqa: ANN001
    """What ``node`` imports: modules, or ``package:name`` for a name that is not a submodule."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parent = module.split(".")[: None if is_package else -1]
        base = ".".join(parent[: len(parent) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else f"{base}:{a.name}" for a in node.names]


def _import_map(modules: dict[str, Path]) -> tuple[dict, dict, list]:
    """Per module: what it imports when loaded, what its lazy ``__getattr__`` imports, and every
    function-local import as ``(module, line, imported)``."""
    top: dict[str, set[str]] = {}
    lazy: dict[str, set[str]] = {}
    local: list[tuple[str, int, str]] = []
    for module, path in modules.items():
        top[module], lazy[module] = set(), set()

        def walk(body, function, module=module, path=path) -> None:  # noqa: ANN001
            for node in body:
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = _imported(node, module, path.name == "__init__.py", modules)
                    if function == "__getattr__":
                        lazy[module].update(names)
                    if function:
                        local.extend((module, node.lineno, name) for name in names)
                    else:
                        top[module].update(names)
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    walk(node.body, function or node.name)
                elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                else:
                    for field in ("body", "orelse", "finalbody", "handlers"):
                        if isinstance(getattr(node, field, None), list):
                            walk(getattr(node, field), function)

        walk(ast.parse(path.read_text()).body, None)
    return top, lazy, local


def test_function_local_imports_only_defer_the_ml_stack():
    """A module of the project imported inside a function must be one whose loading imports torch,
    diffusers, OpenCV... (itself, or through what it imports at its top, or a package's lazy name):
    anything else goes at the top of the module, where the import graph and the no-cycle contract see
    it. The command line is exempt: it defers the optional extras and keeps `likeness --help` instant."""
    modules = _modules()
    top, lazy, local = _import_map(modules)

    def heavy(name: str) -> bool:
        seen: set[str] = set()
        pending = [name]
        while pending:
            item = pending.pop()
            module, _, attribute = item.partition(":")
            if module.split(".")[0] in HEAVY:
                return True
            if item in seen or module not in modules:
                continue
            seen.add(item)
            parts = module.split(".")
            pending += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages load first
            pending += top[module] | (lazy[module] if attribute else set())
        return False

    offenders = [f"{modules[module].relative_to(ROOT)}:{line} imports {name}" for module, line, name in local
                 if name.split(".")[0] in PACKAGES and not module.startswith("likeness_cli") and not heavy(name)]
    assert offenders == []
