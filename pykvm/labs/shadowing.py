"""Refuse to run when a folder named ``pykvm`` shadows the installed package, and say how to fix it.

Why this exists: ``python -m pykvm.labs start 1`` run in a folder that holds a
clone of pykvm's repository (a folder ``pykvm/`` with ``guests/``,
``tests/``... but no ``__init__.py``) made Python take that folder for the
package: ``python -m`` searches the current folder first, and the installed
package (an editable install's finder) is asked only when the current folder
has nothing of that name. Half the package came from each place, and the run
died with "ImportError: cannot import name 'Command' from 'pykvm.guests'
(unknown location)", deep inside pykvm's imports. :mod:`pykvm.labs` calls
:func:`refuse_shadowed_package` before importing anything else of pykvm.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import PyKvmError
from ..startup import running_command

EXIT_USAGE = 2
INSTALLED = Path(__file__).resolve().parent.parent      # the pykvm package this module belongs to


class ShadowedPackage(PyKvmError, ImportError):
    """A folder named ``pykvm`` was imported as the package instead of the installed pykvm."""


def shadowing_folders() -> list[Path]:
    """The folders Python took for the package ``pykvm`` instead of the installed one ([] when none did)."""
    package = sys.modules.get("pykvm")
    folders = [Path(folder).resolve() for folder in getattr(package, "__path__", ())]
    return [] if not folders or INSTALLED in folders else folders


def explain(folders: list[Path]) -> str:
    shown = ", ".join(str(folder) for folder in folders)
    return (f"the folder {shown} shadows the installed pykvm package ({INSTALLED}): Python searches the "
            f"current folder (or the script's folder) before the installed packages, and found a folder "
            f"named pykvm there (a clone of pykvm's repository?). Run the command from another folder (e.g. "
            f"your lab's own folder), rename that folder, or run python -P -m pykvm.labs ... (-P: do not "
            f"search the current folder; Python 3.11 and later).")


def refuse_shadowed_package() -> None:
    """Stop if ``pykvm`` is shadowed: a ``python -m pykvm.labs`` command exits 2 with the reason on stderr;
    an import from a program raises :class:`ShadowedPackage` with the same reason."""
    folders = shadowing_folders()
    if not folders:
        return
    command = running_command()
    if command is not None and command.startswith("pykvm.labs"):
        print(f"python -m {command}: {explain(folders)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    raise ShadowedPackage(explain(folders))
