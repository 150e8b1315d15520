"""``python -m pykvm.boot KERNEL``: boot a Multiboot kernel on KVM, serial on stdout, the guest's exit status.

Why this exists: a test kernel (or kvm-unit-tests-style one) runs from the
shell in one command, and a script or CI job reads its verdict from the exit
status. The status is the guest's own: a write of v to the debug-exit port
0xf4 gives (v << 1) | 1, as QEMU's isa-debug-exit. pykvm's own endings are
even: 0 the guest powered off (KVM system event), 4 a triple fault, 6 a KVM
internal error or failed entry, 8 the first unknown access under
--strict-io, 124 --timeout, 130 Ctrl-C (also while pykvm is still being
imported); 1 is a pykvm error (a bad kernel, a file that is not one), 2 no
usable /dev/kvm or, from argparse, a bad option. Accesses no device claimed
are listed on stderr at the end. See :mod:`pykvm.vmm` for the machine and
its devices.

The kernel's Multiboot command line is ``KERNEL ARGS``: the path as given,
a space, then ``--append``'s text, as QEMU's Multiboot loader makes it
(kvm-unit-tests take the first word as argv[0]). ``--timeout`` counts from
before the kernel is read. The kernel and each ``--initrd`` must be regular
files no larger than the guest's RAM.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

from .command import description, invoked_as
from .exit_status import exit_with, run_command
from .startup import imports_done
from .vmm.cpu_model import DEFAULT_MODEL, CpuFeatureWarning
from .vmm.machine import CHIPSETS, DEFAULT_MEMORY_MIB, OPTIONAL_DEVICES, Ending, Machine

PROG = "pykvm boot"


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text}: must be > 0")
        return value
    return convert


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds, e.g. 10 or 2.5") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number of seconds > 0 (leave the option "
                                         f"out for no limit)")
    return value


def _utf8(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        shown = text.encode(errors="surrogateescape")
        raise argparse.ArgumentTypeError(f"{shown!r}: not valid UTF-8; pass the command line as UTF-8 "
                                         f"text") from None
    return text


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as QEMU prints its own: one line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=invoked_as("pykvm.boot"), description=description(__doc__),
                                     epilog="exit status: (v << 1) | 1 for a write of v to port 0xf4; 0 power "
                                            "off, 1 pykvm error, 2 no KVM, 4 triple fault, 6 internal error, "
                                            "8 --strict-io, 124 timeout, 130 Ctrl-C")
    parser.add_argument("kernel", help="a Multiboot v1 kernel: ELF32, or a binary with the header's address fields")
    parser.add_argument("--smp", type=_positive(int), default=1, metavar="N", help="vCPUs (default 1)")
    parser.add_argument("--memory", type=_positive(int), default=DEFAULT_MEMORY_MIB, metavar="MiB",
                        help=f"RAM in MiB (default {DEFAULT_MEMORY_MIB})")
    parser.add_argument("--append", type=_utf8, default="", metavar="ARGS",
                        help="the kernel's arguments: its Multiboot command line is 'KERNEL ARGS', as QEMU's")
    parser.add_argument("--initrd", action="append", default=[], metavar="FILE",
                        help="a boot module (repeat for more)")
    parser.add_argument("--timeout", type=_seconds, metavar="S",
                        help="stop the guest S seconds after loading began, status 124")
    parser.add_argument("--trace-exits", action="store_true", help="one line per exit to userspace on stderr")
    parser.add_argument("--cpu", default=DEFAULT_MODEL, metavar="MODEL[,+f,-f,f=on|off,key=value]",
                        help=f"the CPU model, in QEMU's -cpu syntax (default {DEFAULT_MODEL}); features KVM "
                             f"lacks are dropped with a warning")
    parser.add_argument("--strict-io", action="store_true",
                        help="end the run (status 8) at the first port or MMIO access no device claims")
    parser.add_argument("--device", action="append", default=[], choices=OPTIONAL_DEVICES, metavar="NAME",
                        help=f"add an optional device, as QEMU's -device (repeat for more): "
                             f"{', '.join(OPTIONAL_DEVICES)} (intel-iommu needs --machine q35)")
    parser.add_argument("--machine", default=CHIPSETS[0], choices=CHIPSETS,
                        help=f"the chipset, as QEMU's -machine (default {CHIPSETS[0]})")
    parser.add_argument("--intremap", action="store_true",
                        help="with --device intel-iommu: interrupt remapping (QEMU's intremap=on)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        imports_done()                  # from here on, Ctrl-C is a KeyboardInterrupt run_command handles
        begun = time.perf_counter()     # --timeout counts the loading too
        machine = Machine(args.kernel, cpus=args.smp, memory=args.memory, cmdline=args.append,
                          modules=args.initrd, serial_output=sys.stdout.buffer, stdin=sys.stdin.isatty(),
                          strict_io=args.strict_io, trace=sys.stderr if args.trace_exits else None,
                          devices=args.device, cpu=args.cpu, chipset=args.machine, intremap=args.intremap)
        with warnings.catch_warnings():
            warnings.simplefilter("always", CpuFeatureWarning)
            warnings.showwarning = _show_warning
            result = machine.run(timeout=args.timeout, begun=begun)
        for access in result.unknown:
            print(f"{PROG}: {access.describe()}", file=sys.stderr)
        if result.ending != Ending.EXIT_PORT:
            if result.serial and not result.serial.endswith(b"\n"):
                sys.stdout.buffer.write(b"\n")
                sys.stdout.flush()
            print(f"{PROG}: {result.ending.value}: {result.message} (status {result.status})", file=sys.stderr)
        if args.trace_exits:
            counts = ", ".join(f"vCPU {cpu}: {count}" for cpu, count in sorted(result.exits.items()))
            print(f"{PROG}: exits to userspace: {counts}", file=sys.stderr)
        return result.status
    return run_command(PROG, body)


if __name__ == "__main__":
    exit_with(main())
