"""kvm-unit-tests' ``x86/unittests.cfg``: its entries, read as the tree's own runner reads them.

Why this exists: the suite's list of tests, with each test's kernel, CPUs,
arguments, QEMU parameters, groups, timeout and conditions, lives in that one
file; ``python -m pykvm.unittests`` and ``pytest --kvm-unit-tests`` must run
the same entries with the same parameters as ``run_tests.sh``. The format is
an INI-like list of ``[name]`` sections of ``key = value`` lines; a value may
be a triple-quoted block over several lines. The words of ``test_args`` and
``qemu_params`` are shell words (quotes, and backticks such as
``\\`date +%s\\```): :func:`shell_words` expands them with bash, as the tree's
runner does with ``eval``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

from ..core.errors import InvalidArgument

CONFIG = Path("x86") / "unittests.cfg"
DEFAULT_TIMEOUT = 90.0          # run_tests.sh's default, "90s"
ARCH = "x86_64"
_SECTION = re.compile(r"^\[(.*)\]$")
_KEY = re.compile(r"^(\w+)\s*=\s*(.*)$")
_TIMEOUT = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(InvalidArgument):
    """The unittests.cfg (or the tree around it) cannot be read as kvm-unit-tests' runner reads it."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One ``[name]`` section of unittests.cfg."""

    name: str
    file: str                   # the kernel, relative to the tree's x86/ folder
    smp: str = "1"              # a number, or an expression such as `getconf _NPROCESSORS_ONLN`
    test_args: str = ""         # shell words: the kernel's command line after its name
    qemu_params: str = ""       # shell words: QEMU options
    groups: tuple[str, ...] = ()
    arch: str = ""
    machine: str = ""
    check: tuple[str, ...] = ()  # path=value conditions, all of which must hold
    accel: str = ""
    timeout: float = DEFAULT_TIMEOUT
    disabled_if: str = ""       # a shell condition: the entry is skipped when it is true

    def kernel(self, tree: Path) -> Path:
        return tree / "x86" / self.file


def read_config(tree: str | os.PathLike) -> list[Entry]:
    """Every entry of ``TREE/x86/unittests.cfg``, in the file's order.

    ``tree`` is a built kvm-unit-tests tree (``./configure && make``), the folder that holds
    ``run_tests.sh``::

        entries = read_config("kvm-unit-tests")
        print([entry.name for entry in entries if "vmexit" in entry.groups])
    """
    root = Path(tree)
    path = root / CONFIG
    if not path.is_file():
        raise ConfigError(f"tree={str(tree)!r}: {path} does not exist; name the top folder of a kvm-unit-tests "
                          f"tree (the one holding run_tests.sh and x86/)")
    return parse_config(path.read_text(errors="replace"), str(path))


def parse_config(text: str, source: str = "unittests.cfg") -> list[Entry]:
    """The entries of unittests.cfg's ``text``; ``source`` names it in errors."""
    sections: list[tuple[str, dict[str, str]]] = []
    lines = iter(enumerate(text.splitlines(), 1))
    for number, raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        section = _SECTION.match(line)
        if section:
            sections.append((section.group(1), {}))
            continue
        key = _KEY.match(line)
        if key is None or not sections:
            continue                    # what the tree's runner ignores, so do we
        value = key.group(2)
        if value.startswith('"""'):
            value = _block(value[3:], lines, source, number)
        sections[-1][1][key.group(1)] = value
    return [_entry(name, values, source) for name, values in sections]


def _block(first: str, lines, source: str, start: int) -> str:
    """The rest of a triple-quoted value: lines up to the closing quotes, joined by spaces."""
    parts = []
    text = first
    while True:
        end = text.find('"""')
        if end >= 0:
            parts.append(text[:end])
            return " ".join(part.rstrip("\\").strip() for part in parts if part.strip())
        parts.append(text)
        try:
            _, text = next(lines)
        except StopIteration:
            raise ConfigError(f"{source} line {start}: a triple-quoted value is never closed; "
                              f"end it with \"\"\"") from None


def _entry(name: str, values: dict[str, str], source: str) -> Entry:
    if "file" not in values:
        raise ConfigError(f"{source}: entry [{name}] has no 'file = NAME.flat' line; every entry names its kernel")
    return Entry(name=name, file=values["file"].strip(), smp=values.get("smp", "1").strip(),
                 test_args=values.get("test_args", "").strip(),
                 qemu_params=(values.get("qemu_params") or values.get("extra_params") or "").strip(),
                 groups=tuple(values.get("groups", "").split()), arch=values.get("arch", "").strip(),
                 machine=values.get("machine", "").strip(), check=tuple(values.get("check", "").split()),
                 accel=values.get("accel", "").strip(),
                 timeout=parse_timeout(values.get("timeout", ""), f"{source} [{name}] timeout"),
                 disabled_if=values.get("disabled_if", "").strip())


def parse_timeout(text: str, what: str) -> float:
    """Seconds for a timeout(1)-style duration (``90``, ``90s``, ``2m``); the default for an empty one."""
    text = text.strip()
    if not text:
        return DEFAULT_TIMEOUT
    match = _TIMEOUT.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"{what} = {text!r}: expected a positive duration such as 90, 90s or 2m")
    return float(match.group(1)) * _UNIT[match.group(2)]


def shell_words(text: str, cwd: Path) -> list[str]:
    """``text``'s shell words as bash expands them (quotes, backticks, variables), run in ``cwd``.

    This is what the tree's runner does with ``eval``: the cfg is the user's own, trusted as much as
    ``run_tests.sh`` trusts it.
    """
    if not text:
        return []
    if not re.search(r"[\"'`$\\]", text):
        return text.split()
    bash = shutil.which("bash")
    if bash is None:
        raise ConfigError(f"{text!r} needs a shell to expand and no bash was found on PATH; install bash")
    done = subprocess.run([bash, "-c", f'printf "%s\\0" {text}'], cwd=cwd, capture_output=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise ConfigError(f"{text!r}: bash could not expand it: {done.stderr.decode(errors='replace').strip()}")
    return [word.decode(errors="surrogateescape") for word in done.stdout.split(b"\0")[:-1]]


def shell_true(condition: str, cwd: Path) -> bool:
    """Whether a ``disabled_if`` shell condition holds (bash, in ``cwd``)."""
    bash = shutil.which("bash") or "/bin/sh"
    return subprocess.run([bash, "-c", condition], cwd=cwd, capture_output=True, timeout=30,
                          stdin=subprocess.DEVNULL).returncode == 0
