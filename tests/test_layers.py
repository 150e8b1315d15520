"""The direction of imports is the architecture: a layer imports only the layers below it.

Layers, bottom to top: core, x86, irqchip, runtime, guests, hosts, then the tools
(every other module of the package). Each module's imports, including those inside
functions and under ``TYPE_CHECKING``, are read with ``ast``; no KVM needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pykvm"
LAYERS = ("core", "x86", "irqchip", "runtime", "guests", "hosts")
TOOLS = len(LAYERS)            # rank of every module outside the layer packages


def rank(module: str) -> int:
    """The layer of a dotted pykvm module name (``pykvm.core.vcpu`` -> 0)."""
    parts = module.split(".")
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


def imported_modules(path: Path, package_root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) of every pykvm import in ``path``."""
    name = module_name(path, package_root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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


@pytest.mark.parametrize("source, expected", [
    ("from ..hosts import detect\n", "pykvm.core.vm (core) imports pykvm.hosts (hosts)"),
    ("from pykvm.guests import Command\n", "pykvm.core.vm (core) imports pykvm.guests (guests)"),
    ("def f():\n    from .. import demo\n", "pykvm.core.vm (core) imports pykvm.demo (tools)"),
    ("import pykvm.runtime.threads\n", "pykvm.core.vm (core) imports pykvm.runtime.threads (runtime)"),
])
def test_a_core_module_importing_a_higher_layer_is_caught(tmp_path, source, expected):
    # The control case: the same walk over a copy of the package where core imports upward.
    copy = tmp_path / "pykvm"
    (copy / "core").mkdir(parents=True)
    (copy / "__init__.py").write_text("")
    (copy / "core" / "__init__.py").write_text("")
    (copy / "core" / "vm.py").write_text(source)
    found = violations(copy)
    assert len(found) == 1 and expected in found[0], found


def test_importing_downward_is_allowed(tmp_path):
    copy = tmp_path / "pykvm"
    (copy / "hosts").mkdir(parents=True)
    (copy / "__init__.py").write_text("")
    (copy / "hosts" / "__init__.py").write_text("")
    (copy / "hosts" / "probes.py").write_text("from ..core.vm import Vm\nfrom ..guests import Command\n")
    assert violations(copy) == []
