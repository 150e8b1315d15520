"""QEMU: its command line, how the guest mounts the root QEMU shares, and the run loop.

Why this exists: the tcg-amd host is QEMU's TCG emulation of AMD-V. The run
loop (:func:`boot`) starts the emulator, streams its serial console (its
stdout) through a :class:`~.console.ConsoleFilter` to the caller, enforces the
deadline, kills the emulator whatever happens, and turns a run that reported
no status into :class:`~.errors.GuestFailed` with the console's tail.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from .console import ConsoleFilter, Markers
from .errors import GuestFailed, GuestTimeout

HOST_ROOT_TAG = "hostroot"
# /init's command that mounts the root shared by qemu_command's -virtfs on /lower.
MOUNT_HOST_ROOT = (f"mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose "
                   f"{HOST_ROOT_TAG} /lower \\\n"
                   f"    || fail \"cannot mount the host's root over 9p (mount tag {HOST_ROOT_TAG})\"")


def qemu_command(qemu: Path, vmlinuz: Path, initrd: Path, memory_mib: int, cpus: int) -> list[str]:
    """The QEMU command line: TCG with AMD-V (``-cpu max``), serial console on stdio, no network.

    ``thread=single``: under multi-threaded TCG (QEMU 7.2, -smp 2) no pytest
    run of pykvm's suite finished. With kernel 6.12 the guest died every time
    (3 of 3) with "Oops: int3" in ``__schedule``, apparently a vCPU running
    stale translated code that still holds the temporary INT3 of a text patch
    (creating and destroying VMs flips the preempt-notifier static key there);
    with 6.1 both vCPUs hung in soft lockups. Round-robin TCG keeps -smp 2 and
    runs the suite.
    """
    return [
        str(qemu), "-accel", "tcg,thread=single", "-cpu", "max",
        "-m", str(memory_mib), "-smp", str(cpus),
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
        "-virtfs", f"local,path=/,mount_tag={HOST_ROOT_TAG},security_model=none,readonly=on,"
                   "multidevs=remap",
    ]


def boot(command: list[str], markers: Markers, timeout: float, output: BinaryIO, host: str) -> int:
    """Run the emulator ``command``, stream the command's output to ``output``, return its exit status.

    ``host`` names the guest in errors.
    """
    console = ConsoleFilter(markers)
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as emulator_stderr:
        emulator = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=emulator_stderr)
        try:
            _pump(emulator, console, deadline, output)
            emulator.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if emulator.poll() is None:
                emulator.kill()
                emulator.wait()
        if console.exit_status is not None:
            return console.exit_status
        if time.monotonic() >= deadline:
            raise GuestTimeout(f"the {host} guest did not finish within {timeout:g} s; QEMU was "
                               f"killed. Raise --timeout if the command is just slow under TCG",
                               console.tail)
        emulator_stderr.seek(0)
        errors = emulator_stderr.read().decode(errors="replace").strip()
        if console.error:
            reason = f"/init failed: {console.error}"
        elif not console.started:
            reason = "the guest stopped before running the command (kernel panic or QEMU error?)"
        else:
            reason = "the guest stopped while the command ran (kernel panic?)"
        raise GuestFailed(f"the {host} guest reported no exit status: {reason}; QEMU exited "
                          f"with {emulator.returncode}" + (f", saying: {errors}" if errors else ""),
                          console.tail)


def _pump(emulator: subprocess.Popen, console: ConsoleFilter, deadline: float, output: BinaryIO) -> None:
    """Copy the emulator's console through ``console`` to ``output`` until EOF or the deadline."""
    assert emulator.stdout is not None
    fd = emulator.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                continue
            data = os.read(fd, 65536)
            if not data:
                return
            passed = console.feed(data)
            if passed:
                output.write(passed)
                output.flush()
