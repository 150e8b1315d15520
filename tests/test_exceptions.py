"""Exceptions injected from the host (``pykvm.injection.Injector.exception``, KVM_SET_VCPU_EVENTS), checked in the
guest's log.

Each delivery test stops a packaged guest image at a sync point (an ``out``
exit), lets KVM finish that instruction (``complete_pending_exit``: KVM_RUN
with ``immediate_exit``), injects the exception and resumes the guest; the
image's handler for that vector records vector, error code, CR2 and the
interrupted RIP. The images' stubs know from the vector number whether the CPU
pushed an error code (guests/common.inc: ERROR_CODE_VECTORS in protected and
long mode, never in real mode); the handler logs CR2 for a #PF that came with
one. Where this host was measured to differ (pykvm.hosts.conformance) the test
asserts the host's measured behaviour and says why.
"""

import pytest

import pykvm
from pykvm import Cap, CapabilityMissing, HostLimitation, InvalidVector, NotReadyForInjection, PyKvmError, x86
from pykvm.core import vcpu as vcpu_module
from pykvm.core.errors import StaleExitError
from pykvm.core.exits import IntrExit, IoExit
from pykvm.core.state import ExceptionEvent
from pykvm.guests import Command
from pykvm.injection import Injector

pytestmark = pytest.mark.injection

MODES = ["real", "protected", "long"]
RFLAGS_RF = 1 << 16
ADDRESS = 0xDEAD000      # a #PF's faulting address (CR2)

# (name, vector, error code in protected and long mode, address): #DE has no error code,
# #GP and #PF have one (#PF also CR2), #DF always pushes 0.
EXCEPTIONS = [("DE", 0, None, None), ("GP", 13, 0x1234, None), ("PF", 14, 0x6, ADDRESS), ("DF", 8, 0, None)]

# Real mode: every vector, exceptions included, is delivered through the IVT (Intel SDM Vol. 3A
# 20.1.4, "Interrupt and Exception Handling" in real-address mode), which pushes FLAGS, CS and IP
# and never an error code; KVM drops has_error_code there, so Injector.exception refuses one and
# the image's real-mode stubs log none. #DE, #GP (a segment-limit overrun) and #DF (a fault while
# delivering another) do happen in real mode. #PF cannot (no paging), but an injected one is
# delivered by its vector like any other, and KVM still loads the payload into CR2.


def _limit(host, mode):
    """kvm_pvm: a 32-bit protected-mode handler runs, but its IRET ends in an emulation error."""
    return mode == "protected" and not host.protected_mode_iret


def _resume(guest, host, mode):
    """Run the guest to its next sync point, expecting the host's measured protected-mode limit."""
    if _limit(host, mode):
        with pytest.raises(HostLimitation, match="IRET in 32-bit protected mode"):
            guest.command(Command.NOP)
    else:
        guest.command(Command.NOP)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,vector,error_code,address", EXCEPTIONS, ids=[e[0] for e in EXCEPTIONS])
def test_injected_exception_reaches_its_handler(boot, host, mode, name, vector, error_code, address):
    guest = boot(mode)
    vcpu = guest.vcpu
    guest.command(Command.NOP)                        # stopped at the sync `out`
    assert isinstance(vcpu.complete_pending_exit(), IntrExit)   # KVM finished the out; no guest code ran
    assert vcpu.complete_pending_exit() is None       # nothing left to finish
    if mode == "real":
        error_code = None
    Injector(vcpu).exception(vector, error_code, address)
    _resume(guest, host, mode)
    (record,) = guest.log()
    assert record.vector == vector
    assert record.error_code == error_code
    assert record.cr2 == (address if mode != "real" else None)   # the real-mode log has no CR2
    # Delivered before the instruction after the completed `out`: that is the interrupted RIP.
    assert record.rip == guest.address("sync_done")
    assert not record.fixed_up and not record.interrupts_were_enabled
    if address is not None:
        assert vcpu.sregs.cr2 == address              # KVM applied the payload (in real mode too)
    exception = vcpu.events.exception                # delivered: neither pending nor injected
    assert (exception.pending, exception.injected) == (0, 0)


@pytest.mark.parametrize("mode", MODES)
def test_without_injection_nothing_is_logged(boot, mode):
    guest = boot(mode)
    guest.command(Command.NOP)
    guest.vcpu.complete_pending_exit()
    guest.command(Command.NOP)
    guest.command(Command.NOP)
    assert guest.log() == []
    assert guest.vcpu.events.exception == ExceptionEvent()


@pytest.mark.parametrize("pending", [True, False], ids=["pending", "injected"])
def test_events_show_the_exception_before_the_run(boot, kvm, pending):
    """Pending: KVM holds CR2 back until delivery. Injected: pykvm wrote CR2 already.

    No explicit complete_pending_exit() here: Injector.exception finishes the sync `out` itself.
    """
    guest = boot("long")
    vcpu = guest.vcpu
    guest.command(Command.NOP)
    if pending and not kvm.check_extension(Cap.EXCEPTION_PAYLOAD):
        with pytest.raises(CapabilityMissing, match="KVM_CAP_EXCEPTION_PAYLOAD"):
            Injector(vcpu).exception(14, 0x6, ADDRESS, pending=True)
        return
    Injector(vcpu).exception(14, 0x6, ADDRESS, pending=pending)
    events = vcpu.events
    exception = events.exception
    assert (exception.nr, exception.has_error_code, exception.error_code) == (14, 1, 0x6)
    if pending:
        assert (exception.pending, exception.injected) == (1, 0)
        assert (events.exception_has_payload, events.exception_payload) == (1, ADDRESS)
        assert vcpu.sregs.cr2 == 0                    # not yet: the payload lands at delivery
    else:
        assert (exception.pending, exception.injected) == (0, 1)
        assert vcpu.sregs.cr2 == ADDRESS              # KVM_SET_SREGS by pykvm, before the run
    guest.command(Command.NOP)
    (record,) = guest.log()
    assert (record.vector, record.error_code, record.cr2) == (14, 0x6, ADDRESS)
    assert record.rip == guest.address("sync_done")
    # A pending fault is delivered the way the CPU delivers a fault: RFLAGS.RF set in the pushed
    # image (Intel SDM Vol. 3B 17.3.1.1; KVM's inject_pending_event). An injected one is already
    # being delivered, and KVM pushes RFLAGS as they are.
    assert bool(record.rflags & RFLAGS_RF) == pending


# (keyword arguments, text the message must contain): refused by the argument checks alone.
INVALID = [
    (dict(vector=32), "vector=32"),
    (dict(vector=255), "vector=255"),
    (dict(vector=-1), "vector=-1"),
    (dict(vector=True), "vector=True"),
    (dict(vector="13"), "vector='13'"),
    (dict(vector=2), "vcpu.nmi()"),
    (dict(vector=0, error_code=0), "error_code=0x0"),
    (dict(vector=6, error_code=5), "error_code=0x5"),
    (dict(vector=13, error_code=1 << 32), "error_code=4294967296"),
    (dict(vector=13, error_code=-1), "error_code=-1"),
    (dict(vector=13, error_code=True), "error_code=True"),
    (dict(vector=13, error_code=0, address=0x1000), "address=4096"),
    (dict(vector=0, address=0), "address=0"),
    (dict(vector=14, error_code=0, address=1 << 64), "address=18446744073709551616"),
]


@pytest.fixture
def ioctls(monkeypatch):
    """``record(vcpu)``: the list of ioctl names (and KVM_RUN) issued from then on, for that vCPU's objects."""
    issued = []

    def record(vcpu):
        for target in (vcpu, vcpu.vm, vcpu.vm.kvm):
            for method in ("_ioctl", "_ioctl_value"):
                original = getattr(target, method)

                def wrapper(request, *args, _original=original, **kwargs):
                    issued.append(request.macro)
                    return _original(request, *args, **kwargs)
                monkeypatch.setattr(target, method, wrapper)
        kvm_run = vcpu_module._run_guarded

        def run(fd, run_struct, guard, held):
            issued.append("KVM_RUN")
            return kvm_run(fd, run_struct, guard, held)
        monkeypatch.setattr(vcpu_module, "_run_guarded", run)
        return issued
    return record


@pytest.mark.parametrize("arguments,text", INVALID, ids=[text for _, text in INVALID])
def test_invalid_arguments_are_refused_before_any_ioctl(boot, ioctls, arguments, text):
    guest = boot("long")
    guest.command(Command.NOP)                        # an unfinished `out`: no KVM_RUN may finish it
    issued = ioctls(guest.vcpu)
    with pytest.raises(InvalidVector) as refused:
        Injector(guest.vcpu).exception(**arguments)
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, PyKvmError)
    assert text in str(refused.value)
    assert issued == []


@pytest.mark.parametrize("mode,arguments,text", [
    ("real", dict(vector=13, error_code=0), "real mode"),
    ("real", dict(vector=8, error_code=0), "drop error_code"),
    ("protected", dict(vector=13), "pass error_code="),
    ("long", dict(vector=14, address=ADDRESS), "pass error_code="),
    ("long", dict(vector=8), "pass error_code="),
    ("long", dict(vector=1, address=0x4000, pending=False), "KVM_SET_DEBUGREGS"),
], ids=["real-GP-error-code", "real-DF-error-code", "protected-GP-none", "long-PF-none", "long-DF-none",
        "long-DB-payload-injected"])
def test_mode_dependent_refusals_change_nothing(boot, host, ioctls, mode, arguments, text):
    """Whether an error code is due depends on CR0.PE: read (KVM_GET_SREGS), never written."""
    guest = boot(mode)
    guest.command(Command.NOP)
    issued = ioctls(guest.vcpu)
    with pytest.raises(InvalidVector, match=text.replace("(", r"\(")):
        Injector(guest.vcpu).exception(**arguments)
    assert "KVM_GET_SREGS" in issued
    assert not [name for name in issued if name.startswith("KVM_SET") or name in ("KVM_RUN", "KVM_ENABLE_CAP")]
    assert guest.vcpu.events.exception == ExceptionEvent()
    guest.command(Command.NOP)
    assert guest.log() == []


def test_a_second_exception_is_refused_not_replaced(boot):
    guest = boot("long")
    vcpu = guest.vcpu
    guest.command(Command.NOP)
    Injector(vcpu).exception(0)
    with pytest.raises(NotReadyForInjection, match="already has exception 0"):
        Injector(vcpu).exception(13, error_code=0)
    assert vcpu.events.exception.nr == 0
    guest.command(Command.NOP)
    assert [(r.vector, r.error_code) for r in guest.log()] == [(0, None)]


IN_GUEST = """
start:  in $0x80, %al
after_in:
        out %al, $0x81
        hlt
"""


def test_complete_pending_exit_keeps_the_reply_to_an_in(vm):
    code = pykvm.assemble(IN_GUEST, "long", origin=x86.FREE_MEMORY)
    vm.memory.write(x86.FREE_MEMORY, code.code)
    vcpu = vm.create_vcpu()
    x86.enter_long_mode(vcpu, code.symbols["start"])
    exit = vcpu.run()
    assert isinstance(exit, IoExit) and not exit.is_out and exit.port == 0x80
    with pytest.raises(NotReadyForInjection, match="not been answered"):
        vcpu.complete_pending_exit()                  # KVM would take whatever kvm_run holds
    with pytest.raises(NotReadyForInjection, match="not been answered"):
        Injector(vcpu).exception(0)                   # the same check, before anything is set
    exit.reply(0x5A)
    assert isinstance(vcpu.complete_pending_exit(), IntrExit)
    regs = vcpu.regs
    assert regs.rax & 0xFF == 0x5A                    # KVM stored the reply ...
    assert regs.rip == code.symbols["after_in"]       # ... and stepped past the in, no further
    with pytest.raises(StaleExitError):
        exit.reply(0x11)                              # that exit is finished
    out = vcpu.run()
    assert isinstance(out, IoExit) and out.is_out and (out.port, out.value) == (0x81, 0x5A)


def test_complete_pending_exit_leaves_a_kick_pending(boot):
    guest = boot("long")
    vcpu = guest.vcpu
    guest.command(Command.NOP)
    vcpu.kick()
    assert isinstance(vcpu.complete_pending_exit(), IntrExit)
    assert vcpu.kvm_run.immediate_exit == 1           # the kick still stops the next run()
    assert isinstance(vcpu.run(), IntrExit)
    assert vcpu.kvm_run.immediate_exit == 0
    guest.command(Command.NOP)
    assert guest.log() == []


def test_closed_vcpu_is_refused(vm):
    vcpu = vm.create_vcpu()
    vcpu.close()
    with pytest.raises(pykvm.ClosedError):
        Injector(vcpu).exception(0)
    with pytest.raises(pykvm.ClosedError):
        vcpu.complete_pending_exit()
