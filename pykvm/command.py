"""``pykvm COMMAND [ARG ...]``: one console command for the tools that ``python -m pykvm.X`` runs.

Why this exists: a user should not have to know which module is a tool, nor
type ``python -m``; ``pykvm --help`` lists every tool with a line each, and
``pykvm X ARG ...`` runs the module ``pykvm.X`` exactly as ``python -m
pykvm.X ARG ...`` does (its own options, ``--help``, exit statuses and Ctrl-C
handling), so each tool keeps one parser and one ``main``. The one-line
summaries are the first lines of the tools' module docstrings, read without
importing the tools.
"""

from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__, startup

# The subcommands: `pykvm NAME` runs the module pykvm.NAME as `python -m pykvm.NAME` does.
TOOLS = ("demo", "doctor", "boot", "unittests", "labs", "requests", "bench", "hosts")


def summary(tool: str) -> str:
    """The first line of ``tool``'s docstring (a package's ``__main__``), without ``python -m ...``.

    Read from the source as text: importing, or even finding, ``pykvm.X.__main__`` would import the
    package ``pykvm.X``, and parsing eight modules took 50 ms.
    """
    spec = importlib.util.find_spec(f"pykvm.{tool}")
    if spec is None or spec.origin is None:
        raise LookupError(f"pykvm's tool {tool!r}: module pykvm.{tool} is missing; reinstall pykvm")
    source = Path(spec.origin)
    if spec.submodule_search_locations:
        source = source.with_name("__main__.py")
    text = source.read_text(encoding="utf-8")
    start = text.find('"""') + 3                  # the module docstring: the file's first string
    first = text[start:text.find("\n", start)].removesuffix('"""') if start >= 3 else ""
    line = first.split("``: ", 1)[1] if first.startswith("``python -m") and "``: " in first else first
    return line.replace("``", "")


def parser() -> argparse.ArgumentParser:
    """The top-level parser: only ``--help`` and ``--version``; the listing of the tools is its epilog."""
    width = max(len(tool) for tool in TOOLS)
    listing = "\n".join(f"  {tool:<{width}}  {summary(tool)}" for tool in TOOLS)
    top = argparse.ArgumentParser(
        prog="pykvm", usage="pykvm [-h] [--version] COMMAND [ARG ...]",
        description="the tools of pykvm, a Python driver for Linux KVM, as one command",
        epilog=f"commands:\n{listing}\n\n'pykvm COMMAND --help' shows a command's own options; "
               f"'pykvm COMMAND' is 'python -m pykvm.COMMAND'.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"pykvm {__version__}")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pykvm ARGV``: list the tools, or hand the rest of ``argv`` to the tool named first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        parser().parse_args(argv)           # --help, --version or a bad option: exits
        parser().error("a COMMAND is required")
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        parser().error(f"unknown command {name!r}: choose from {', '.join(TOOLS)}")
    module = f"pykvm.{name}"
    startup.guard_imports(module)           # for pykvm.boot: a Ctrl-C while it imports is 130, as under python -m
    sys.argv = [f"pykvm {name}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0                                # the tool's own __main__ block exits with its status
