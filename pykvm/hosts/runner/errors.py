"""How a host runner fails: its exceptions and its exit statuses."""

from __future__ import annotations

from ...core.errors import PyKvmError

EXIT_TIMEOUT = 124            # as timeout(1)
EXIT_RUNNER_FAILED = 125      # the guest never reported the command's status
EXIT_INTERRUPTED = 130        # Ctrl-C


class HostRunnerError(PyKvmError):
    """The runner could not prepare or boot the test host."""


class MissingTool(HostRunnerError):
    """A tool the runner needs is not installed and could not be installed."""


class KernelUnavailable(HostRunnerError):
    """No usable Debian kernel package (none in apt's lists, or not unpackable)."""


class MirrorUnreachable(KernelUnavailable):
    """apt could not reach the Debian mirror to fetch the kernel package."""


class InitramfsError(HostRunnerError):
    """A kernel module the guest needs is missing or unreadable."""


class GuestFailed(HostRunnerError):
    """The guest stopped without reporting the command's exit status; ``tail`` is its console."""

    def __init__(self, message: str, tail: str) -> None:
        super().__init__(f"{message}\n--- last lines of the guest console ---\n{tail}")
        self.tail = tail


class GuestTimeout(GuestFailed):
    """The guest did not finish within ``--timeout``; the emulator was killed."""
