"""Imports only go down: the package's layers, and the import graph checked against them.

Every ``.py`` under ``mllm_cl/``, ``callbacks/`` and ``data_modules/`` is parsed (``ast``); every import
of a project module, at module level or inside a function, is an edge from the importing module's
group to the imported one's. A group is the first name below ``mllm_cl`` (``mllm_cl.system.loop``:
``system``; the ``callbacks/`` and ``data_modules/`` folders are ``mllm_cl.callbacks`` and
``mllm_cl.data_modules``). An import may go to a group of a lower layer only: never up, never
sideways to another group of the same layer.

    python tests/test_import_layers.py    # the imports that go up or sideways, one a line
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"mllm_cl": "mllm_cl", "callbacks": "mllm_cl.callbacks", "data_modules": "mllm_cl.data_modules"}

#: The layers, lowest first. A group imports only groups of the layers before its own.
LAYERS: list[tuple[str, ...]] = [
    ("_packages", "errors"),  # no project imports: the package finders; the user-error base
    ("mllm_cl",),  # the package itself: its version, the finders installed
    ("console", "distributed", "fit_options"),  # output, process groups, fit's help and option checks
    ("data", "experts"),  # samples and task sequences; expert layers and routers
    ("backbones", "eval"),  # the models; scoring and generation
    ("callbacks", "data_modules"),  # Lightning callbacks (thin shells over a method), the LightningDataModule
    ("methods",),  # the continual methods: their experts, phases, state and callbacks
    ("system",),  # the LightningModule, the loop, the run directory, building a run from its config
    ("fit", "report", "use", "pretrain", "demo"),  # the commands
    ("plan", "quickstart"),  # commands made of other commands
    ("cli",),  # the ``mllm-cl`` entry point
]


def layer_of(group: str) -> int | None:
    return next((i for i, groups in enumerate(LAYERS) if group in groups), None)


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    return {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    importer: str
    imported: str
    in_function: bool

    def __str__(self) -> str:
        where = "in a function" if self.in_function else "at module level"
        a, b = group_of(self.importer), group_of(self.imported)
        return (f"{self.path.relative_to(ROOT)}:{self.line}: {self.importer} ({a}, layer {layer_of(a)}) imports "
                f"{self.imported} ({b}, layer {layer_of(b)}) {where}")


def _project_name(name: str) -> str | None:
    top = name.partition(".")[0]
    if top == "mllm_cl":
        return name
    if top in ("callbacks", "data_modules"):  # the folders' deprecated top-level names
        return f"mllm_cl.{name}"
    return None


def imports(path: Path, module: str, known: set[str]) -> list[Import]:
    """The project modules ``path`` imports, module level and in functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from a import b``: the submodule a.b where there is one, else the module a
            names = [f"{base}.{a.name}" if _project_name(f"{base}.{a.name}") in known else base for a in node.names]
        for name in dict.fromkeys(names):
            target = _project_name(name)
            if target is not None:
                found.append(Import(path, node.lineno, module, target, id(node) in in_function))
    return found


def graph() -> list[Import]:
    modules = sources()
    return [i for module, path in modules.items() for i in imports(path, module, set(modules))]


def not_down(edges: list[Import]) -> list[Import]:
    """The imports that go up a layer, or sideways to another group of the same layer."""
    bad = []
    for i in edges:
        a, b = group_of(i.importer), group_of(i.imported)
        if a != b and layer_of(a) is not None and layer_of(b) is not None and layer_of(b) >= layer_of(a):
            bad.append(i)
    return bad


def test_every_group_has_a_layer():
    groups = {group_of(m) for m in sources()}
    assert not sorted(g for g in groups if layer_of(g) is None), "add the group to LAYERS"
    named = [g for layer in LAYERS for g in layer]
    assert len(named) == len(set(named))


def test_the_check_sees_imports_of_every_kind(tmp_path):
    code = ("import mllm_cl.cli\nfrom mllm_cl import fit\nfrom .system import loop\n"
            "def f():\n    from callbacks.cmoe import ProbeStatistics\n")
    path = tmp_path / "console.py"
    path.write_text(code)
    found = imports(path, "mllm_cl.console", set(sources()))
    assert [(i.imported, i.in_function) for i in found] == [
        ("mllm_cl.cli", False), ("mllm_cl.fit", False), ("mllm_cl.system.loop", False),
        ("mllm_cl.callbacks.cmoe", True)]


def test_imports_only_go_down():
    bad = not_down(graph())
    assert not bad, "imports that do not go down a layer:\n" + "\n".join(map(str, bad))


if __name__ == "__main__":
    bad = not_down(graph())
    print("\n".join(map(str, bad)))
    print(f"{len(bad)} imports do not go down", file=sys.stderr)
    sys.exit(1 if bad else 0)
