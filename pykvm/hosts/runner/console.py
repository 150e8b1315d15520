"""The guest's serial console: markers ``/init`` prints, and the filter that finds them.

Why this exists: the console carries boot noise, the command's output and its
exit status together. ``/init`` prints a start marker before the command and an
exit marker with its status after it; :class:`ConsoleFilter` passes only what
lies between them, and keeps the console's last lines for diagnostics. The
markers hold a per-run nonce, so the command's own output cannot forge them.
"""

from __future__ import annotations

import dataclasses
import re
import secrets

_TAIL_BYTES = 16384
_TAIL_LINES = 40
# Terminal escape sequences (SeaBIOS resets and clears the screen) and control characters.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b.|[\x00-\x08\x0b-\x1f\x7f]")
# Kernel lines after which the guest runs nothing more: a panic, or the power-off / halt /
# reboot message (KERN_EMERG, so `dmesg -n 1` does not hide them). Bochs without ACPI cannot
# power off and a panic there reboots, so the runner must see these itself.
_GUEST_STOPPED = re.compile(rb"\[\s*\d+\.\d+\] (?:Kernel panic - not syncing|reboot: )")


@dataclasses.dataclass(frozen=True)
class Markers:
    """Console lines ``/init`` prints; the nonce keeps the command's output from forging them."""

    nonce: str

    @property
    def start(self) -> str:
        return f"PYKVM-HOSTS-START-{self.nonce}"

    @property
    def exit(self) -> str:
        return f"PYKVM-HOSTS-EXIT-STATUS-{self.nonce}="

    @property
    def error(self) -> str:
        return f"PYKVM-HOSTS-ERROR-{self.nonce}: "

    @classmethod
    def fresh(cls) -> Markers:
        return cls(secrets.token_hex(8))


def tail_lines(text: str, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


class ConsoleFilter:
    """Turns the guest's serial console into the command's output and exit status.

    ``feed(bytes)`` returns the bytes to pass to the caller: nothing before the
    start marker (boot noise), everything after it up to the exit marker. A
    partial marker at the end of a chunk is held back until the next chunk
    shows whether it is one. ``exit_status`` is set once the exit marker's line
    is complete; ``error`` holds ``/init``'s error message, if it printed one;
    ``guest_stopped`` is set by a kernel panic or power-off line. ``finished``:
    nothing more will come that matters.
    """

    def __init__(self, markers: Markers) -> None:
        self.started = False
        self.exit_status: int | None = None
        self.error: str | None = None
        self.guest_stopped = False
        self._start = markers.start.encode()
        self._exit = markers.exit.encode()
        self._error = markers.error.encode()
        self._pending = b""
        self._tail = b""

    @property
    def tail(self) -> str:
        """The console's last lines, without carriage returns and terminal escape sequences."""
        return tail_lines(_CONTROL.sub("", self._tail.decode(errors="replace")))

    @property
    def finished(self) -> bool:
        return self.exit_status is not None or self.error is not None or self.guest_stopped

    def feed(self, data: bytes) -> bytes:
        self._tail = (self._tail + data)[-_TAIL_BYTES:]
        # from the start of the line the new data continues (a line may span chunks)
        line_start = self._tail.rfind(b"\n", 0, max(0, len(self._tail) - len(data))) + 1
        if not self.guest_stopped and _GUEST_STOPPED.search(self._tail, line_start):
            self.guest_stopped = True
        if self.exit_status is not None:
            return b""
        self._pending += data
        if not self.started:
            return self._before_start()
        return self._after_start()

    def _before_start(self) -> bytes:
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if self._error in line:
                self.error = line.split(self._error, 1)[1].decode(errors="replace")
            if line.endswith(self._start):
                self.started = True
                return self._after_start()
        return b""

    def _after_start(self) -> bytes:
        at = self._pending.find(self._exit)
        if at >= 0:
            output, rest = self._pending[:at], self._pending[at + len(self._exit):]
            if b"\n" in rest:
                self.exit_status = int(rest.split(b"\n", 1)[0].strip())
                self._pending = b""
            else:
                self._pending = self._pending[at:]
            return output
        held = next((k for k in range(min(len(self._exit) - 1, len(self._pending)), 0, -1)
                     if self._pending.endswith(self._exit[:k])), 0)
        cut = len(self._pending) - held
        output, self._pending = self._pending[:cut], self._pending[cut:]
        return output
