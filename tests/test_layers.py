"""The direction of imports is the architecture: a layer imports only the layers below it.

Layers, bottom to top: core, injection, x86, irqchip, runtime, guests, hosts, then the tools
(every other module of the package, and every package's ``__main__``). Each module's imports, including those inside
functions and under ``TYPE_CHECKING``, are read with ``ast``; no KVM needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pykvm"
LAYERS = ("core", "injection", "x86", "irqchip", "runtime", "guests", "hosts")
TOOLS = len(LAYERS)            # rank of every module outside the layer packages


def rank(module: str) -> int:
    """The layer of a dotted pykvm module name (``pykvm.core.vcpu`` -> 0); a package's ``__main__`` is a tool
    (``python -m pykvm.hosts``), whichever layer its package is."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return TOOLS
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if len(parts) > 1 and parts[1] == "_binding":
        return 0
    return TOOLS


def module_name(path: Path, package: Path = PACKAGE) -> str:
    relative = path.relative_to(package.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, package_root: Path = PACKAGE, annotations: bool = True) -> list[tuple[int, str]]:
    """(line, absolute module) of every pykvm import in ``path``; without those under ``if TYPE_CHECKING:``
    unless ``annotations``."""
    name = module_name(path, package_root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for inner in ast.walk(node)} if not annotations else set()
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or node.level and not node.module:
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, module) for line, module in found if module.split(".")[0] == "pykvm"]


def violations(package: Path = PACKAGE) -> list[str]:
    """Every import of a higher layer, as ``file:line: a (layer) imports b (layer)``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        if name == "pykvm":       # the top-level package re-exports every layer
            continue
        for line, module in imported_modules(path, package):
            if rank(module) > rank(name):
                found.append(f"{path.relative_to(package.parent)}:{line}: {name} "
                             f"({_layer(name)}) imports {module} ({_layer(module)})")
    return found


def _layer(module: str) -> str:
    level = rank(module)
    return LAYERS[level] if level < TOOLS else "tools"


def test_no_layer_imports_a_higher_one():
    assert violations() == []


def test_every_layer_package_exists():
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").exists(), layer


def _package_with(tmp_path: Path, module: str, source: str) -> Path:
    """A stand-in ``pykvm`` package under ``tmp_path`` holding one module (``"core/vm.py"``) with ``source``."""
    copy = tmp_path / "pykvm"
    path = copy / module
    path.parent.mkdir(parents=True)
    (copy / "__init__.py").write_text("")
    (path.parent / "__init__.py").write_text("")
    path.write_text(source)
    return copy


@pytest.mark.parametrize("source, expected", [
    ("from ..hosts import detect\n", "pykvm.core.vm (core) imports pykvm.hosts (hosts)"),
    ("from pykvm.guests import Command\n", "pykvm.core.vm (core) imports pykvm.guests (guests)"),
    ("def f():\n    from .. import demo\n", "pykvm.core.vm (core) imports pykvm.demo (tools)"),
    ("import pykvm.runtime.threads\n", "pykvm.core.vm (core) imports pykvm.runtime.threads (runtime)"),
])
def test_a_core_module_importing_a_higher_layer_is_caught(tmp_path, source, expected):
    # The control case: the same walk over a copy of the package where core imports upward.
    found = violations(_package_with(tmp_path, "core/vm.py", source))
    assert len(found) == 1 and expected in found[0], found


def test_importing_downward_is_allowed(tmp_path):
    copy = tmp_path / "pykvm"
    (copy / "hosts").mkdir(parents=True)
    (copy / "__init__.py").write_text("")
    (copy / "hosts" / "__init__.py").write_text("")
    (copy / "hosts" / "probes.py").write_text("from ..core.vm import Vm\nfrom ..guests import Command\n")
    assert violations(copy) == []


def import_cycles(package: Path = PACKAGE, annotations: bool = False) -> list[list[str]]:
    """Every set of pykvm modules that import one another in a circle when Python runs them, at module
    level or in a function (a ``from . import x`` of the package's own submodule ``x`` imports ``x``,
    not the package). With ``annotations``, also those imported only under ``TYPE_CHECKING``: there
    the core's objects name their owners' types (a Vcpu's ``vm: Vm``), circles pykvm still has."""
    names = {module_name(path, package): path for path in package.rglob("*.py")}
    graph = {name: {module for _, module in imported_modules(path, package, annotations)
                    if module in names and module != name}
             for name, path in names.items()}
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(name: str) -> None:          # Tarjan's strongly connected components
        order[name] = low[name] = len(order)
        stack.append(name)
        for module in sorted(graph[name]):
            if module not in order:
                visit(module)
                low[name] = min(low[name], low[module])
            elif module in stack:
                low[name] = min(low[name], order[module])
        if low[name] == order[name]:
            component = []
            while not component or component[-1] != name:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in order:
            visit(name)
    return cycles


def test_no_modules_import_each_other():
    assert import_cycles() == []


def test_the_circles_left_are_type_annotations_only():
    # What is left to untie (the owner types the core's children annotate); a new one fails here.
    assert import_cycles(annotations=True) == [
        ["pykvm.core.eventfds", "pykvm.core.exits", "pykvm.core.memory", "pykvm.core.system", "pykvm.core.vcpu",
         "pykvm.core.vm"],
        ["pykvm.guests.images", "pykvm.guests.session"],
        ["pykvm.labs.framework", "pykvm.labs.verdict"]]


def test_a_circle_of_imports_is_caught(tmp_path):
    # The control: two tools that import each other, one of them only inside a function.
    copy = tmp_path / "pykvm"
    copy.mkdir()
    (copy / "__init__.py").write_text("")
    (copy / "a.py").write_text("from . import b\n")
    (copy / "b.py").write_text("def f():\n    from .a import g\n")
    (copy / "c.py").write_text("from . import a\n")
    (copy / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import x\n")
    (copy / "e.py").write_text("from .d import y\n")
    (copy / "c.py").write_text("from . import a, e\n")
    assert import_cycles(copy) == [["pykvm.a", "pykvm.b"]]
    assert import_cycles(copy, annotations=True) == [["pykvm.a", "pykvm.b"], ["pykvm.c", "pykvm.d", "pykvm.e"]]


def import_time_hooks(package: Path = PACKAGE) -> list[str]:
    """Every statement run at import, outside the core, that sets an attribute of a core module or object.

    That is how a layer would register a hook with the core (``exits.EXPLAIN = explain_exit``,
    ``setattr(Vcpu, "policy", ...)``), which the core would then call without its caller passing it in.
    Policy and explanations are given explicitly (``GuestSession(explain=...)``, ``Injector(vcpu)``), so none
    may exist; code inside functions (a lab's trace wrapping ``Vcpu`` while it runs) is not run at import.
    """
    found = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        if rank(name) == 0:
            continue
        tree = ast.parse(path.read_text(), str(path))
        core_names = _names_bound_to_core(tree, name, path.name == "__init__.py")
        for statement in _run_at_import(tree.body):
            for node in ast.walk(statement):
                targets = []
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                elif isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and node.args:
                    targets = [ast.Attribute(node.args[0], "?")]
                for target in targets:
                    root = target
                    while isinstance(root, (ast.Attribute, ast.Subscript)):
                        root = root.value
                    if target is not root and isinstance(root, ast.Name) and root.id in core_names:
                        found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def _run_at_import(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of a module body that run when it is imported (not function or class bodies' functions)."""
    statements: list[ast.stmt] = []
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(statement, ast.ClassDef):
            statements += _run_at_import(statement.body)
        else:
            statements.append(statement)
    return statements


def _names_bound_to_core(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """The names a module binds to core modules or to objects imported from the core."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names
                      if rank(alias.name) == 0 and alias.name.startswith("pykvm.core")}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                target = source if node.module else f"{source}.{alias.name}"
                if target.startswith("pykvm.core") or target == "pykvm._binding":
                    names.add(alias.asname or alias.name)
    return names


def test_no_layer_registers_a_hook_with_the_core_at_import():
    assert import_time_hooks() == []


@pytest.mark.parametrize("source, caught", [
    ("from ..core import exits\n\ndef explain(vcpu, exit): ...\n\nexits.EXPLAIN = explain\n", True),
    ("from ..core.vcpu import Vcpu\nsetattr(Vcpu, 'policy', None)\n", True),
    ("from ..core.vcpu import Vcpu\n\ndef install():\n    Vcpu.policy = None\n", False),   # the control: not at import
    ("from ..core import exits\nEXPLAIN = exits.ExitExplainer\n", False),
])
def test_a_hook_set_on_the_core_at_import_is_caught(tmp_path, source, caught):
    found = import_time_hooks(_package_with(tmp_path, "hosts/limits.py", source))
    assert bool(found) == caught and all("pykvm/hosts/limits.py" in line for line in found), found
