"""``pykvm COMMAND [ARG ...]``: one console command for the tools that ``python -m pykvm.X`` runs.

Why this exists: a user should not have to know which module is a tool, nor
type ``python -m``; ``pykvm --help`` lists every tool with a line each, and
``pykvm X ARG ...`` runs the module ``pykvm.X`` exactly as ``python -m
pykvm.X ARG ...`` does (its own options, ``--help``, exit statuses and Ctrl-C
handling), so each tool keeps one parser and one ``main``. The one-line
summaries are the first lines of the tools' module docstrings, read without
importing the tools, so ``pykvm --help`` answers in milliseconds.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import runpy
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__, startup


@dataclass(frozen=True)
class Tool:
    """A subcommand: its name after ``pykvm``; ``python -m pykvm.NAME`` runs the same."""

    name: str

    @property
    def module(self) -> str:
        return f"pykvm.{self.name}"

    def summary(self) -> str:
        """The first line of the tool's docstring (a package's ``__main__``), without ``python -m ...``.

        Read from the source: finding ``pykvm.X.__main__`` would import the package ``pykvm.X``.
        """
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise LookupError(f"pykvm's tool {self.name!r}: module {self.module} is missing; reinstall pykvm")
        source = Path(spec.origin)
        if spec.submodule_search_locations:
            source = source.with_name("__main__.py")
        first = (ast.get_docstring(ast.parse(source.read_text(encoding="utf-8"))) or "").split("\n", 1)[0]
        summary = first.split("``: ", 1)[1] if first.startswith("``python -m") and "``: " in first else first
        return summary.replace("``", "")


TOOLS = tuple(Tool(name) for name in ("demo", "doctor", "boot", "unittests", "labs", "requests", "bench", "hosts"))
BY_NAME = {tool.name: tool for tool in TOOLS}


def parser() -> argparse.ArgumentParser:
    """The top-level parser: only ``--help`` and ``--version``; the listing of the tools is its epilog."""
    width = max(len(tool.name) for tool in TOOLS)
    listing = "\n".join(f"  {tool.name:<{width}}  {tool.summary()}" for tool in TOOLS)
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
    if name not in BY_NAME:
        parser().error(f"unknown command {name!r}: choose from {', '.join(tool.name for tool in TOOLS)}")
    tool = BY_NAME[name]
    if tool.module in startup.COMMANDS:
        startup.guard_imports(tool.module)  # a Ctrl-C while the tool imports: 130, as under python -m
    sys.argv = [f"pykvm {name}", *rest]
    runpy.run_module(tool.module, run_name="__main__", alter_sys=True)
    return 0                                # the tool's own __main__ block exits with its status
