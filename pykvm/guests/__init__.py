"""The guests layer: the packaged guest images and the host side of their protocol.

Why this exists: delivery is checked inside the guest. The images
(``guests/{real,protected,long}.S``) install handlers for all 256 vectors that
log every vector they receive; :mod:`~pykvm.guests.images` loads and boots
them, :mod:`~pykvm.guests.session` drives them through
:mod:`~pykvm.guests.protocol` and reads :mod:`~pykvm.guests.log`;
:mod:`~pykvm.guests.layout` is their memory map::

    from pykvm import guests
    from pykvm.guests import Command

    with guests.boot("long") as guest:
        guest.command(Command.STI)
        guest.vcpu.interrupt(0x40)
        guest.command(Command.NOP)
        assert guest.log()[-1].vector == 0x40
"""

from .images import MODES, BootedGuest, GuestImage, boot, boot_cpus, load
from .log import LogRecord, parse_log, parse_record
from .protocol import Command
from .session import COMMAND_TIMEOUT, GuestSession, GuestStop, StopKind

__all__ = ["MODES", "BootedGuest", "GuestImage", "boot", "boot_cpus", "load", "LogRecord", "parse_log",
           "parse_record", "Command", "COMMAND_TIMEOUT", "GuestSession", "GuestStop", "StopKind"]
