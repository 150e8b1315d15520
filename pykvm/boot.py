"""``python -m pykvm.boot KERNEL``: boot a Multiboot kernel on KVM, serial on stdout, the guest's exit status.

Why this exists: a test kernel (or kvm-unit-tests-style one) runs from the
shell in one command, and a script or CI job reads its verdict from the exit
status. The status is the guest's own: a write of v to the debug-exit port
0xf4 gives (v << 1) | 1, as QEMU's isa-debug-exit. pykvm's own endings are
even: 0 the guest powered off (KVM system event), 4 a triple fault, 6 a KVM
internal error or failed entry, 8 the first unknown access under
--strict-io, 124 --timeout, 130 Ctrl-C; 1 is a pykvm error (a bad kernel, a
bad option), 2 no usable /dev/kvm. Accesses no device claimed are listed on
stderr at the end. See :mod:`pykvm.vmm` for the machine and its devices.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .cli import exit_with, run_command
from .vmm.cpu_model import DEFAULT_MODEL, CpuFeatureWarning
from .vmm.machine import DEFAULT_MEMORY_MIB, Ending, Machine

PROG = "pykvm boot"


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text}: must be > 0")
        return value
    return convert


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as QEMU prints its own: one line on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pykvm.boot", description=__doc__.split("\n\n")[0],
                                     epilog="exit status: (v << 1) | 1 for a write of v to port 0xf4; 0 power "
                                            "off, 1 pykvm error, 2 no KVM, 4 triple fault, 6 internal error, "
                                            "8 --strict-io, 124 timeout, 130 Ctrl-C")
    parser.add_argument("kernel", help="a Multiboot v1 kernel: ELF32, or a binary with the header's address fields")
    parser.add_argument("--smp", type=_positive(int), default=1, metavar="N", help="vCPUs (default 1)")
    parser.add_argument("--memory", type=_positive(int), default=DEFAULT_MEMORY_MIB, metavar="MiB",
                        help=f"RAM in MiB (default {DEFAULT_MEMORY_MIB})")
    parser.add_argument("--append", default="", metavar="ARGS", help="the kernel command line")
    parser.add_argument("--initrd", action="append", default=[], metavar="FILE",
                        help="a boot module (repeat for more)")
    parser.add_argument("--timeout", type=_positive(float), metavar="S",
                        help="stop the guest after S seconds, status 124")
    parser.add_argument("--trace-exits", action="store_true", help="one line per exit to userspace on stderr")
    parser.add_argument("--cpu", default=DEFAULT_MODEL, metavar="MODEL[,+f,-f,f=on|off,key=value]",
                        help=f"the CPU model, in QEMU's -cpu syntax (default {DEFAULT_MODEL}); features KVM "
                             f"lacks are dropped with a warning")
    parser.add_argument("--strict-io", action="store_true",
                        help="end the run (status 8) at the first port or MMIO access no device claims")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        machine = Machine(args.kernel, cpus=args.smp, memory=args.memory, cmdline=args.append,
                          modules=args.initrd, serial_output=sys.stdout.buffer, stdin=sys.stdin.isatty(),
                          strict_io=args.strict_io, trace=sys.stderr if args.trace_exits else None,
                          cpu=args.cpu)
        with warnings.catch_warnings():
            warnings.simplefilter("always", CpuFeatureWarning)
            warnings.showwarning = _show_warning
            result = machine.run(timeout=args.timeout)
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
