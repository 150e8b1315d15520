"""QEMU: its command line and how the guest mounts the root QEMU shares.

Why this exists: the tcg-amd host is QEMU's TCG emulation of AMD-V, booted
straight into the kernel with the host's ``/`` shared over 9p; its serial
console is QEMU's stdout, read by :func:`.emulator.boot`.
"""

from __future__ import annotations

from pathlib import Path

HOST_ROOT_TAG = "hostroot"
# /init's command that mounts the root shared by qemu_command's -virtfs on /lower.
MOUNT_HOST_ROOT = (f"mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose "
                   f"{HOST_ROOT_TAG} /lower \\\n"
                   f"    || fail \"cannot mount the host's root over 9p (mount tag {HOST_ROOT_TAG})\"")


# What QEMU says when it aborts, and why it does; measured on this project's machines with QEMU 7.2 (Debian 12).
KNOWN_ABORTS = {
    "tcg_handle_interrupt: assertion failed: (qemu_mutex_iothread_locked())": (
        "QEMU's TCG aborts when a nested guest (one that KVM runs under the emulated AMD-V) writes CR8 while a "
        "virtual interrupt is pending in its VMCB (V_IRQ, set while KVM waits for an interrupt window): QEMU "
        "7.2's CR8-write helper raises the virtual interrupt after it has released its global lock. Measured: "
        "`mov %rax,%cr8` with IF=0 and an interrupt pending at the PIC aborts QEMU every time, and never "
        "without the pending interrupt; kvm-unit-tests' emulator test (`mov %cr8`) run by QEMU inside this host "
        "hits it"),
}


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

