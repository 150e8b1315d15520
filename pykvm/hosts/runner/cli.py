"""``python -m pykvm.hosts HOST [options] (--prepare | -- COMMAND)``: the command line of the runners.

Why this exists: one entry point for every host runner (tcg-amd, bochs-intel),
with the same options, exit statuses (the command's own; 124 timeout, 125
runner failure, 130 Ctrl-C) and the guarantee that the emulator is killed in
every case. What differs per host (its defaults, kvm_intel's or kvm_amd's parameters) is
decided by :func:`host_settings`, a pure function.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from collections.abc import Sequence

from . import bochs_intel, tcg_amd
from .errors import EXIT_INTERRUPTED, EXIT_RUNNER_FAILED, EXIT_TIMEOUT, GuestTimeout, HostRunnerError
from .tools import say

HOSTS = (tcg_amd.NAME, bochs_intel.NAME)
DEFAULT_TIMEOUT = 1200.0
DEFAULT_MEMORY_MIB = 2048
# pykvm's SMP tests run 2 vCPUs in 2 threads, and kvm_amd runs them with -smp 2.
# The guest's vCPUs share one host thread (TCG's thread=single, see qemu.qemu_command).
DEFAULT_CPUS = 2
# Per host: (memory MiB, vCPUs, timeout s). Bochs runs one CPU (bochs.bochsrc says why) and
# needs less memory than QEMU's page cache of the 9p root.
HOST_DEFAULTS = {tcg_amd.NAME: (DEFAULT_MEMORY_MIB, DEFAULT_CPUS, DEFAULT_TIMEOUT),
                 bochs_intel.NAME: (1024, 1, 1800.0)}

_DESCRIPTION = "run a command on a second KVM host: kvm_amd (tcg-amd) or kvm_intel (bochs-intel)."
_EPILOG = f"""\
examples:
  %(prog)s tcg-amd --prepare
  %(prog)s tcg-amd -- .venv/bin/python -m pytest -q
  %(prog)s bochs-intel -- .venv/bin/python -m pykvm.doctor

tcg-amd boots a Debian kernel under QEMU's TCG emulation of AMD-V, loads
kvm_amd, and runs COMMAND chrooted into this machine's / (shared read-only
over 9p, made writable by an overlay in guest RAM whose writes are
discarded), in the current directory, with PATH, HOME, USER, LOGNAME, LANG,
LANGUAGE, TZ, TERM, VIRTUAL_ENV, CI, NO_COLOR, FORCE_COLOR, PY_COLORS and
every LC_*, PYTHON*, PYKVM_*, PYTEST_* variable, plus
PYTHONDONTWRITEBYTECODE=1 (and TERM=dumb when stdout is not a terminal).
stdin is /dev/null; stdout and stderr both arrive on stdout.

Missing Debian packages (qemu-system-x86, busybox-static, cpio) are
installed with apt-get when running as root. The newest linux-image-*-amd64
in apt's lists is downloaded once and cached with its initramfs in
$XDG_CACHE_HOME/pykvm/tcg-amd (default ~/.cache/pykvm/tcg-amd).

bochs-intel boots the same kind of kernel under Bochs 3.0's emulated VMX
(built once from Debian's source package), loads kvm_intel (enable_apicv=0
by default: Bochs 3.0 rejects kvm_intel's posted-interrupt descriptor) and
runs COMMAND on an ext4 image holding the current directory, the virtualenv,
pykvm, the base Python and binutils at their paths here, under the same
overlay and with the same environment. One CPU. It installs genisoimage,
isolinux, syslinux-common, busybox-static, cpio, e2fsprogs, g++ and make
when missing, and caches Bochs, the boot ISO and the disk image in
$XDG_CACHE_HOME/pykvm/bochs-intel.

exit status: COMMAND's own; {EXIT_TIMEOUT} on timeout; {EXIT_RUNNER_FAILED} when the host could
not be prepared or the guest reported no status (kvm_amd did not load,
kernel panic); {EXIT_INTERRUPTED} on Ctrl-C. The emulator is killed in every case.
"""


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the runner's arguments at the first ``--``: (runner options, command)."""
    if "--" not in argv:
        return list(argv), []
    at = list(argv).index("--")
    return list(argv[:at]), list(argv[at + 1:])


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage="%(prog)s HOST [options] (--prepare | -- COMMAND [ARG ...])",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", choices=HOSTS, help="the KVM host to run on")
    parser.add_argument("--prepare", action="store_true",
                        help="only install the tools and fetch/build what the host caches (kernel, "
                             "initramfs; for bochs-intel also Bochs, the ISO and the disk image)")
    parser.add_argument("--kernel", metavar="RELEASE",
                        help="Debian kernel release to boot, e.g. 6.1.0-56-amd64 (default: the "
                             "newest linux-image-*-amd64 in apt's lists)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"kill the emulator after this long (default {DEFAULT_TIMEOUT:g}, "
                             f"bochs-intel {HOST_DEFAULTS[bochs_intel.NAME][2]:g})")
    parser.add_argument("--memory", type=int, metavar="MiB",
                        help=f"guest memory (default {DEFAULT_MEMORY_MIB}, bochs-intel "
                             f"{HOST_DEFAULTS[bochs_intel.NAME][0]})")
    parser.add_argument("--cpus", type=int, metavar="N",
                        help=f"guest vCPUs (default {DEFAULT_CPUS}; bochs-intel runs 1)")
    parser.add_argument("--kvm-intel-parameters", metavar="PARAMETERS",
                        help=f"bochs-intel: kvm_intel's module parameters (default "
                             f"'{bochs_intel.DEFAULT_KVM_INTEL_PARAMETERS}'; '' for the module's own)")
    parser.add_argument("--kvm-amd-parameters", metavar="PARAMETERS",
                        help="tcg-amd: kvm_amd's module parameters, e.g. 'npt=0' for shadow paging (default: "
                             "the module's own)")
    return parser


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run uses, after the host's defaults."""

    memory_mib: int
    cpus: int
    timeout: float
    kvm_intel_parameters: str | None
    kvm_amd_parameters: str = ""


def host_settings(host: str, memory: int | None, cpus: int | None, timeout: float | None,
                  kvm_intel_parameters: str | None, kvm_amd_parameters: str | None = None) -> Settings | str:
    """The settings of a run on ``host``, or why the options do not fit it (a usage error)."""
    default_memory, default_cpus, default_timeout = HOST_DEFAULTS[host]
    settings = Settings(default_memory if memory is None else memory, default_cpus if cpus is None else cpus,
                        default_timeout if timeout is None else timeout, kvm_intel_parameters)
    if settings.cpus < 1 or settings.memory_mib < 256 or settings.timeout <= 0:
        return "--cpus must be >= 1, --memory >= 256 and --timeout > 0"
    if kvm_amd_parameters is not None:
        if host != tcg_amd.NAME:
            return f"--kvm-amd-parameters is for tcg-amd; {host} loads kvm_intel"
        try:
            settings = dataclasses.replace(settings,
                                           kvm_amd_parameters=tcg_amd.check_kvm_amd_parameters(kvm_amd_parameters))
        except ValueError as exc:
            return f"--kvm-amd-parameters: {exc}"
    if host == bochs_intel.NAME:
        if settings.cpus != 1:
            return ("bochs-intel runs one CPU: Bochs's SMP build showed the guest one CPU without ACPI, "
                    "lost its disks with ACPI, and was 4-5 times slower (docs/howto/other-hosts.md)")
        if kvm_intel_parameters is None:
            return dataclasses.replace(settings, kvm_intel_parameters=bochs_intel.DEFAULT_KVM_INTEL_PARAMETERS)
        if "\n" in kvm_intel_parameters:
            return "--kvm-intel-parameters must be one line"
    elif kvm_intel_parameters is not None:
        return f"--kvm-intel-parameters is for bochs-intel; {host} loads kvm_amd"
    return settings


def main(argv: Sequence[str] | None = None, prog: str = "python -m pykvm.hosts") -> int:
    """Run ``PROG ARGV`` (``prog``: how the user ran it, for the usage line)."""
    options, command = split_command(sys.argv[1:] if argv is None else argv)
    parser = _parser(prog)
    args = parser.parse_args(options)
    if not args.prepare and not command:
        parser.error("give the command to run after --, or --prepare")
    settings = host_settings(args.host, args.memory, args.cpus, args.timeout, args.kvm_intel_parameters,
                             args.kvm_amd_parameters)
    if isinstance(settings, str):
        parser.error(settings)
    # SIGTERM unwinds like Ctrl-C, so QEMU is killed rather than orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.prepare:
            (bochs_intel if args.host == bochs_intel.NAME else tcg_amd).prepare(args.kernel)
            return 0
        if args.host == bochs_intel.NAME:
            assert settings.kvm_intel_parameters is not None
            return bochs_intel.run(command, args.kernel, settings.memory_mib, settings.timeout,
                                   settings.kvm_intel_parameters)
        return tcg_amd.run(command, args.kernel, settings.memory_mib, settings.cpus, settings.timeout,
                           settings.kvm_amd_parameters)
    except GuestTimeout as exc:
        say(str(exc))
        return EXIT_TIMEOUT
    except HostRunnerError as exc:
        say(f"{type(exc).__name__}: {exc}")
        return EXIT_RUNNER_FAILED
    except KeyboardInterrupt:
        say("interrupted; the emulator was killed")
        return EXIT_INTERRUPTED
