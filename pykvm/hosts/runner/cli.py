"""``python -m pykvm.hosts HOST [options] (--prepare | -- COMMAND)``: the command line of the runners.

Why this exists: one entry point for every host runner, with the same options,
exit statuses (the command's own; 124 timeout, 125 runner failure, 130 Ctrl-C)
and the guarantee that the emulator is killed in every case.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from . import tcg_amd
from .errors import EXIT_INTERRUPTED, EXIT_RUNNER_FAILED, EXIT_TIMEOUT, GuestTimeout, HostRunnerError
from .tools import say

HOSTS = (tcg_amd.NAME,)
DEFAULT_TIMEOUT = 1200.0
DEFAULT_MEMORY_MIB = 2048
# pykvm's SMP tests run 2 vCPUs in 2 threads, and kvm_amd runs them with -smp 2.
# The guest's vCPUs share one host thread (TCG's thread=single, see qemu.qemu_command).
DEFAULT_CPUS = 2

_DESCRIPTION = "run a command on a second KVM host, kvm_amd."
_EPILOG = f"""\
examples:
  python -m pykvm.hosts tcg-amd --prepare
  python -m pykvm.hosts tcg-amd -- .venv/bin/python -m pytest -q

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

exit status: COMMAND's own; {EXIT_TIMEOUT} on timeout; {EXIT_RUNNER_FAILED} when the host could
not be prepared or the guest reported no status (kvm_amd did not load,
kernel panic); {EXIT_INTERRUPTED} on Ctrl-C. QEMU is killed in every case.
"""


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the runner's arguments at the first ``--``: (runner options, command)."""
    if "--" not in argv:
        return list(argv), []
    at = list(argv).index("--")
    return list(argv[:at]), list(argv[at + 1:])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pykvm.hosts",
        usage="%(prog)s HOST [options] (--prepare | -- COMMAND [ARG ...])",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", choices=HOSTS, help="the KVM host to run on")
    parser.add_argument("--prepare", action="store_true",
                        help="only install the tools and fetch/build the cached kernel and "
                             "initramfs (for CI to call first)")
    parser.add_argument("--kernel", metavar="RELEASE",
                        help="Debian kernel release to boot, e.g. 6.1.0-56-amd64 (default: the "
                             "newest linux-image-*-amd64 in apt's lists)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"kill QEMU after this long (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, metavar="MiB",
                        help=f"guest memory (default {DEFAULT_MEMORY_MIB})")
    parser.add_argument("--cpus", type=int, default=DEFAULT_CPUS, metavar="N",
                        help=f"guest vCPUs (default {DEFAULT_CPUS})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options, command = split_command(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(options)
    if not args.prepare and not command:
        parser.error("give the command to run after --, or --prepare")
    if args.cpus < 1 or args.memory < 256 or args.timeout <= 0:
        parser.error("--cpus must be >= 1, --memory >= 256 and --timeout > 0")
    # SIGTERM unwinds like Ctrl-C, so QEMU is killed rather than orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.prepare:
            tcg_amd.prepare(args.kernel)
            return 0
        return tcg_amd.run(command, args.kernel, args.memory, args.cpus, args.timeout)
    except GuestTimeout as exc:
        say(str(exc))
        return EXIT_TIMEOUT
    except HostRunnerError as exc:
        say(f"{type(exc).__name__}: {exc}")
        return EXIT_RUNNER_FAILED
    except KeyboardInterrupt:
        say("interrupted; QEMU was killed")
        return EXIT_INTERRUPTED
