"""Teaching labs: ``python -m pykvm.labs`` lists them, ``start N`` hands one out, ``check N`` grades it.

Why this exists: the way to learn how an interrupt reaches a guest is to make it
happen on a real ``/dev/kvm`` and be told, step by step, what the guest and KVM
did. Each lab is a sheet (Markdown: goal, background, steps, questions), a
starter (``lab.py`` with TODO gaps) and a checker: steps that run the
student's code in a child process with a deadline (:mod:`pykvm.labs.runner`)
and judge what happened in the guest (its vector log, its reports) and in KVM
(the exits, the registers read back, the stats counters) as recorded by
:data:`pykvm.labs.framework.TRACE`, never what the student's functions return.
Every run randomises what it asks for (vectors, ports, values), so a
hard-coded answer fails; ``--seed`` repeats a run.

Adding a lab (one folder)
-------------------------
Create ``pykvm/labs/labNN_short_name/`` (``NN`` = the lab's number) with:

``sheet.md``
    What the student reads. Explain from scratch, in pykvm's words; say what
    the student will see on each kind of host where hosts differ (name the
    :class:`pykvm.hosts.HostInfo` fact), and end with questions answered by
    running code.
``starter.py``
    Copied to the student's directory as ``lab.py``: runnable, with the
    functions the checker calls (``solve(task)`` and friends) and clearly
    marked ``TODO`` gaps that raise ``NotImplementedError("TODO: ...")``.
``__init__.py``
    Defines ``LAB = Lab(number, title, teaches, minutes, steps,
    folder=lab_folder(__file__), requires=(Cap...,), support=...)``. Each
    :class:`~pykvm.labs.framework.Step` has a title, a ``check(ctx)`` that
    returns a detail or raises :class:`~pykvm.labs.framework.Fail`, and a hint
    that teaches without giving the answer. Build the task in a scenario run
    through ``ctx.once(key, scenario)`` (shared by the steps that judge it; name
    the key after the student's function), draw its parameters from
    ``ctx.random(key)``, call the student with ``ctx.call(name, task)``, and
    judge ``ctx.trace`` (exits with registers, injections with the readiness
    they were made in), the guest's memory and log, and ``ctx.host``'s facts.
    That judgement runs beside the student's code and is a diagnosis; a
    step's ``evidence(verdict)`` rule runs in the checker's own process on
    KVM's counters and the injections as they were made, and draws the task
    again from ``verdict.random(key)`` (see :mod:`pykvm.labs.verdict`).
    ``support(host)`` says whether the host runs the lab fully.

Put the reference solution in ``tests/labs_reference/labNN.py`` (never in the
package: the student's copy must not contain it) and a wrong solution or two
beside it; ``tests/test_labs.py`` picks them up. ``setup.py`` installs every
lab folder found here, with its sheet and starter.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re

from .shadowing import refuse_shadowed_package

refuse_shadowed_package()       # first: a folder named pykvm in the current folder breaks the imports below

# isort: split
from .framework import Fail, Lab, Step, Support  # noqa: E402

__all__ = ["Fail", "Lab", "Step", "Support", "all_labs", "get_lab"]

_LAB_PACKAGE = re.compile(r"lab(\d+)_\w+$")


def _folders() -> dict[int, str]:
    """The lab packages of this folder by the number their name gives (``lab05_interrupt_window``: 5)."""
    return {int(match.group(1)): info.name for info in pkgutil.iter_modules(__path__)
            if info.ispkg and (match := _LAB_PACKAGE.match(info.name))}


@functools.cache
def _load(number: int, package: str) -> Lab:
    lab = importlib.import_module(f"{__name__}.{package}").LAB
    if lab.number != number:
        raise ValueError(f"pykvm.labs.{package} defines lab {lab.number}; its folder says {number}")
    return lab


def all_labs() -> tuple[Lab, ...]:
    """Every lab folder of this package, by number."""
    return tuple(_load(number, package) for number, package in sorted(_folders().items()))


def get_lab(number: int) -> Lab:
    """Lab ``number``; only its package is imported (a check's processes need no other lab's imports)."""
    package = _folders().get(number)
    if package is None:
        raise KeyError(f"there is no lab {number}; the labs are {', '.join(map(str, sorted(_folders())))} "
                       f"(python -m pykvm.labs)")
    return _load(number, package)
