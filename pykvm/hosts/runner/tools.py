"""The calling machine's side: messages, subprocesses, apt, and the tools a runner needs.

Why this exists: a runner takes its emulator, busybox and kernel from Debian's
archive. These small functions are its only contact with apt and ``PATH``:
they locate a tool, install its package when running as root, and say what to
do otherwise.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .console import tail_lines
from .elf import is_static_elf
from .errors import MissingTool

_OFFLINE_SIGNS = ("Could not resolve", "Temporary failure resolving", "Failed to fetch",
                  "Could not connect", "Unable to connect", "Connection failed",
                  "Network is unreachable", "Connection timed out")


def say(message: str) -> None:
    """A message of the runner (stderr; stdout carries the command's output)."""
    print(f"pykvm.hosts: {message}", file=sys.stderr, flush=True)


def offline(apt_output: str) -> bool:
    """True when apt's output says it could not reach the mirror."""
    return any(sign in apt_output for sign in _OFFLINE_SIGNS)


def run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool non-interactively; stdout and stderr together in ``stdout``."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def is_root() -> bool:
    return os.geteuid() == 0


def apt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``apt-get`` / ``apt-cache``; MissingTool when this machine has no apt."""
    tool = args[0]
    if shutil.which(tool) is None:
        raise MissingTool(f"{tool} not found: pykvm.hosts takes its emulator, busybox and kernel "
                          f"from Debian's archive, so it needs Debian or Ubuntu with apt")
    return run(args, cwd)


def apt_update() -> subprocess.CompletedProcess[str]:
    say("apt-get update")
    return apt("apt-get", "update")


def locate_tool(name: str) -> Path | None:
    """The executable ``name``; for busybox, only a statically linked one (it runs in the initramfs).

    An absolute ``name`` is a file a package installs (a boot loader image), located as is.
    """
    if name.startswith("/"):
        return Path(name) if os.path.isfile(name) else None
    if name != "busybox":
        found = shutil.which(name)
        return Path(found) if found else None
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and os.path.isfile(candidate):
            with open(candidate, "rb") as file:
                if is_static_elf(file.read(65536)):
                    return Path(candidate)
    return None


def ensure_tools(packages: Mapping[str, str]) -> dict[str, Path]:
    """Locate each tool of ``packages`` (tool -> Debian package), installing packages as root when missing."""
    missing = [name for name in packages if locate_tool(name) is None]
    if missing:
        needed = [packages[name] for name in missing]
        install = ["apt-get", "install", "-y", "--no-install-recommends", *needed]
        fix = f"run `{'' if is_root() else 'sudo '}{shlex.join(install)}`"
        if not is_root():
            raise MissingTool(f"{', '.join(missing)} not found (Debian packages "
                              f"{', '.join(needed)}); {fix}")
        say(f"installing {' '.join(needed)}")
        result = apt(*install)
        if result.returncode != 0:           # stale or missing package lists
            apt_update()
            result = apt(*install)
        if result.returncode != 0:
            cause = "apt cannot reach the Debian mirror" if offline(result.stdout) else "apt-get failed"
            raise MissingTool(f"{', '.join(missing)} not found and {cause}; {fix}\n"
                              f"{tail_lines(result.stdout, 10)}")
    located = {name: locate_tool(name) for name in packages}
    still = [name for name, path in located.items() if path is None]
    if still:
        raise MissingTool(f"{', '.join(still)} still not found after installing "
                          f"{', '.join(packages[n] for n in still)}")
    return {name: path for name, path in located.items() if path is not None}
