"""``pykvm COMMAND [ARG ...]``: one console command for the tools that ``python -m pykvm.X`` runs.

Why this exists: a user should not have to know which module is a tool, nor
type ``python -m``; ``pykvm --help`` lists every tool with a line each, and
``pykvm X ARG ...`` runs the module ``pykvm.X`` exactly as ``python -m
pykvm.X ARG ...`` does (its own options, ``--help``, exit statuses and Ctrl-C
handling), so each tool keeps one parser and one ``main``. The one-line
summaries are the first lines of the tools' module docstrings, read without
importing the tools.

A tool's ``--help`` speaks as the user ran it: its usage line is ``pykvm X``,
``python -m pykvm X`` or ``python -m pykvm.X`` (:func:`invoked_as`), and its
description is its docstring's first line as plain text (:func:`description`),
not the reST the site renders.
"""

from __future__ import annotations

import argparse
import re
import runpy
import sys
from collections.abc import Sequence

from . import __version__, startup

# The subcommands: `pykvm NAME` runs the module pykvm.NAME as `python -m pykvm.NAME` does.
TOOLS = ("demo", "doctor", "boot", "unittests", "labs", "requests", "bench", "hosts")
CONSOLE_COMMAND = "pykvm"                    # the script pip installs (setup.py's console_scripts)
PACKAGE_AS_PROGRAM = "python -m pykvm"       # the same command without the script (pykvm/__main__.py)
_RUNNING: dict[str, str] = {}                # module -> how main() ran it: {"pykvm.demo": "pykvm demo"}
# A reST role as docstrings write it: :mod:`pykvm.core`, :py:class:`~pykvm.core.vm.Vm` (shown as Vm), :ref:`a <b>`.
_ROLE = re.compile(r":(?:[a-z]+:)+`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")


def invoked_as(module: str) -> str:
    """The tool ``module`` (``pykvm.X``) as the user ran it: ``pykvm X`` or ``python -m pykvm X`` when
    :func:`main` runs it, else ``python -m pykvm.X``."""
    return _RUNNING.get(module, f"python -m {module}")


def plain_text(rest: str) -> str:
    """``rest`` (a docstring's reST) as a terminal shows it: roles and ``literals`` reduced to their text."""
    text = _ROLE.sub(lambda role: role[2].rsplit(".", 1)[-1] if role[1] else role[2], rest)
    return text.replace("``", "")


def description(docstring: str | None) -> str:
    """A tool's ``--help`` description: its docstring's first line as plain text, without the leading
    ``python -m pykvm.X ...``: (the usage line says how to run it)."""
    first = (docstring or "").strip().split("\n", 1)[0].removesuffix('"""')
    if first.startswith("``python -m") and "``: " in first:
        first = first.split("``: ", 1)[1]
    return plain_text(first)


def summary(tool: str) -> str:
    """``tool``'s one-line :func:`description`, from its docstring (a package's ``__main__``'s).

    Read from the source as text: importing, or even finding, ``pykvm.X.__main__`` would import the
    package ``pykvm.X``, and parsing eight modules took 50 ms. Its imports are here: a tool run through
    ``pykvm X`` needs neither.
    """
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec(f"pykvm.{tool}")
    if spec is None or spec.origin is None:
        raise LookupError(f"pykvm's tool {tool!r}: module pykvm.{tool} is missing; reinstall pykvm")
    source = Path(spec.origin)
    if spec.submodule_search_locations:
        source = source.with_name("__main__.py")
    text = source.read_text(encoding="utf-8")
    start = text.find('"""') + 3                  # the module docstring: the file's first string
    return description(text[start:text.find("\n", start)] if start >= 3 else "")


def parser(prog: str = CONSOLE_COMMAND) -> argparse.ArgumentParser:
    """The top-level parser: only ``--help`` and ``--version``; the listing of the tools is its epilog."""
    width = max(len(tool) for tool in TOOLS)
    listing = "\n".join(f"  {tool:<{width}}  {summary(tool)}" for tool in TOOLS)
    top = argparse.ArgumentParser(
        prog=prog, usage=f"{prog} [-h] [--version] COMMAND [ARG ...]",
        description="the tools of pykvm, a Python driver for Linux KVM, as one command",
        epilog=f"commands:\n{listing}\n\n'{prog} COMMAND --help' shows a command's own options; "
               f"'{prog} COMMAND' is 'python -m pykvm.COMMAND'.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=f"pykvm {__version__}")
    return top


def main(argv: Sequence[str] | None = None, prog: str = CONSOLE_COMMAND) -> int:
    """Run ``PROG ARGV``: list the tools, or hand the rest of ``argv`` to the tool named first.

    ``prog`` is how the user ran this: :data:`CONSOLE_COMMAND`, or :data:`PACKAGE_AS_PROGRAM`
    from ``pykvm/__main__.py``; the tool's usage line says the same (:func:`invoked_as`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        parser(prog).parse_args(argv)       # --help, --version or a bad option: exits
        parser(prog).error("a COMMAND is required")
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        parser(prog).error(f"unknown command {name!r}: choose from {', '.join(TOOLS)}")
    module = f"pykvm.{name}"
    startup.guard_imports(module)           # for pykvm.boot: a Ctrl-C while it imports is 130, as under python -m
    _RUNNING[module] = f"{prog} {name}"
    sys.argv[1:] = rest                     # argv[0] becomes the module's file, as under python -m
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0                                # the tool's own __main__ block exits with its status
