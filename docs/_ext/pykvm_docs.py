"""Pages of pykvm's site that are generated from the code when the site is built.

Why this exists: a command's options, KVM's requests and the API change with
the code; written by hand into the site they would go stale. Each comes from
its one source here, at build time:

- ``pykvm-help``: a command's ``--help`` text, run as a user runs it
  (``python -m pykvm.X [SUB] --help``), so each command keeps one parser;
- ``pykvm-requests``: the table of KVM's requests from
  :data:`pykvm.requests.REQUESTS` (where each is made and handled, pykvm's
  trigger, the evidence, and what was measured on each host);
- the API pages under ``reference/api/`` (git-ignored), one per module of
  :data:`API_PACKAGES` and :data:`API_MODULES`, written before reading the sources, each an
  ``automodule`` of its docstrings.

It also resolves, for the nitpicky build, a Python reference the Python
domain cannot (:func:`resolve_by_import`): a name as the code imports it
(``pykvm.Kvm``, or ``CapabilityMissing`` in a module that imported it)
links to where it is defined and documented (Python's own names through
intersphinx, by their full name: ``Path`` imported from :mod:`pathlib`); a constant or type variable
without a docstring of its own links to its module's page. A name that
imports nothing stays a broken reference.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

from docutils import nodes
from docutils.nodes import Element
from docutils.statemachine import StringList
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.ext import intersphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import make_refnode

REPOSITORY = Path(__file__).resolve().parents[2]
# The library's layers and the packages a user programs against; the tools' modules document themselves
# through their --help (reference/commands), and a lab's package is its sheet (labs/).
API_PACKAGES = ("pykvm.core", "pykvm.injection", "pykvm.x86", "pykvm.irqchip", "pykvm.runtime", "pykvm.guests",
                "pykvm.hosts", "pykvm.vmm", "pykvm.requests", "pykvm.testing")
# The tools' shared modules, each a page of its own (a tool's package is in API_PACKAGES when it holds a table).
API_MODULES = ("pykvm.command", "pykvm.exit_status", "pykvm.startup", "pykvm.interrupt_path")
API_DIR = "reference/api"
HELP_WIDTH = "100"


class CommandHelp(SphinxDirective):
    """``.. pykvm-help:: TOOL [SUBCOMMAND]``: the ``--help`` of ``python -m pykvm.TOOL``, as a literal block."""

    required_arguments = 0
    optional_arguments = 2

    def run(self) -> list[nodes.Node]:
        module = ["-m", f"pykvm.{self.arguments[0]}"] if self.arguments else ["-m", "pykvm"]
        argv = [sys.executable, *module, *self.arguments[1:], "--help"]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPOSITORY, timeout=120,
                              env={**os.environ, "COLUMNS": HELP_WIDTH})
        if done.returncode != 0:
            raise self.error(f"{' '.join(argv[1:])} exited {done.returncode}: {done.stderr.strip()}")
        text = done.stdout.rstrip()
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


class RequestsTable(SphinxDirective):
    """``.. pykvm-requests::``: KVM's requests, one row each, from :data:`pykvm.requests.REQUESTS`."""

    def run(self) -> list[nodes.Node]:
        from pykvm.hosts.vendor import VendorModule
        from pykvm.requests import REQUESTS
        hosts = (VendorModule.PVM, VendorModule.AMD, VendorModule.INTEL)
        lines = ["| request | made in | handled in | pykvm's trigger | evidence | "
                 + " | ".join(host.value for host in hosts) + " |",
                 "|---" * (5 + len(hosts)) + "|"]
        for request in REQUESTS:
            measured = [request.expected.get(host, "-") for host in hosts]
            if request.amd_shadow:
                measured[1] += f" (npt=0: {request.amd_shadow})"
            cells = [f"`{request.name}`", request.made_in, request.handled_in, request.trigger, request.evidence,
                     *measured]
            lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="pykvm.requests.REQUESTS"), self.content_offset,
                                container)
        return container.children


def api_modules() -> list[str]:
    """Every module of :data:`API_PACKAGES`, packages first, without ``__main__`` (running it is the tool)."""
    names = []
    for package in API_PACKAGES:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [info.name for info in pkgutil.walk_packages(path, f"{package}.")
                  if not info.name.endswith("__main__")]
    return names + list(API_MODULES)


def write_api_pages(app: Sphinx) -> None:
    """Write ``reference/api/*.rst`` (one ``automodule`` a module) and their index, before Sphinx reads."""
    out = Path(app.srcdir) / API_DIR
    out.mkdir(parents=True, exist_ok=True)
    modules = api_modules()
    wanted = {f"{name}.rst" for name in modules} | {"index.rst"}
    for stale in out.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()
    for name in modules:
        # :ignore-module-all: documents what a module defines, not what its __all__ re-exports from another
        _write_if_changed(out / f"{name}.rst",
                          f"{name}\n{'=' * len(name)}\n\n.. automodule:: {name}\n   :ignore-module-all:\n")
    _write_if_changed(out / "index.rst", api_index(modules))


def api_index(modules: list[str]) -> str:
    """The API's first page: what ``from pykvm import NAME`` offers, where each is defined, then the modules."""
    import pykvm
    exports = "\n".join(f"- ``pykvm.{name}``: :py:obj:`pykvm{module}.{attribute}`"
                         for name, (module, attribute) in pykvm._WHERE.items())
    toctree = "\n".join(f"   {name}" for name in modules)
    return (f"API\n===\n\nOne page per module, from its docstrings (autodoc). ``import pykvm`` offers these "
            f"names, each imported on its first use (:mod:`pykvm`), and the subpackages "
            f"{', '.join(f':mod:`pykvm.{name}`' for name in pykvm._SUBPACKAGES)}:\n\n{exports}\n\n"
            f".. automodule:: pykvm\n   :no-members:\n\n.. toctree::\n   :maxdepth: 1\n\n{toctree}\n")


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:     # an unchanged page is not rebuilt
        path.write_text(text)


def _import_dotted(name: str) -> tuple[object, str, list[str]] | None:
    """The object ``name`` names: the longest importable module prefix, then attributes; None if none is."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        owner = ".".join(parts[:cut])
        rest = parts[cut:]
        for index, attribute in enumerate(rest):
            if not hasattr(value, attribute):
                return None
            if index < len(rest) - 1:
                owner = _canonical(getattr(value, attribute), f"{owner}.{attribute}")
            value = getattr(value, attribute)
        return value, owner, rest
    return None


def _canonical(value: object, fallback: str) -> str:
    """Where ``value`` is defined: module and qualified name for a module, class or function, else ``fallback``."""
    if isinstance(value, type(sys)):
        return value.__name__
    module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return fallback


def resolve_by_import(app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: Element
                      ) -> Element | None:
    """A Python reference the domain missed, resolved as Python would import the name (see the module's doc)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    module, cls = node.get("py:module"), node.get("py:class")
    scopes = [f"{module}.{cls}." if module and cls else None, f"{module}." if module else None, ""]
    domain = env.get_domain("py")
    for scope in filter(lambda scope: scope is not None, scopes):
        found = _import_dotted(f"{scope}{target}")
        if found is None:
            continue
        value, owner, rest = found
        name = _canonical(value, f"{owner}.{'.'.join(rest)}" if rest else owner)
        if not name.startswith("pykvm"):                    # Python's own (pathlib.Path...): intersphinx, by its name
            retry = node.deepcopy()
            retry["reftarget"] = name
            return intersphinx.missing_reference(app, env, retry, contnode)
        if name in domain.objects:                          # type: ignore[attr-defined]
            entry = domain.objects[name]                    # type: ignore[attr-defined]
            return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)
        while name and name not in domain.modules:          # type: ignore[attr-defined]
            name = name.rpartition(".")[0]                  # undocumented: the page of its module
        if name:
            entry = domain.modules[name]                    # type: ignore[attr-defined]
            return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, name)
    return None


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("pykvm-help", CommandHelp)
    app.add_directive("pykvm-requests", RequestsTable)
    app.connect("builder-inited", write_api_pages)
    app.connect("missing-reference", resolve_by_import)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
