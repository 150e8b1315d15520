"""The core's docstring examples run on the hardware, and every core method has one.

Why this exists: the core is a binding, one method per ioctl, and its
reference is its docstrings. Each public method and property of the
classes that own an fd or issue an ioctl (Kvm, Vm, Vcpu, the eventfds, Stats,
guest memory and its userfaultfd) says which ioctl it issues in its first
line and ends with an ``Example::`` block that builds what it needs and
asserts what the kernel reported; this module runs every such block (a fresh
namespace each) so the examples stay true, and refuses a member that has none.
"""

import inspect
import re
import textwrap

import pytest

from pykvm.core.eventfds import Ioeventfd, Irqfd
from pykvm.core.ioctls import Ioctl
from pykvm.core.memory import GuestMemory
from pykvm.core.stats import Stats
from pykvm.core.system import Kvm
from pykvm.core.userfault import PageProvider, UffdIoctl, Userfaultfd
from pykvm.core.vcpu import Vcpu
from pykvm.core.vm import Vm

CLASSES = (Kvm, Vm, Vcpu, Irqfd, Ioeventfd, Stats, GuestMemory, Userfaultfd, PageProvider)

# Public members that issue no ioctl of their own, so their first line names none. They still
# need an example, except those in NO_EXAMPLE: a name for messages, an fd number, close(2), and
# plain accesses to guest memory, which show nothing an example of their own would add.
NOT_IOCTLS = {
    "Vcpu.exit_sequence": "a counter pykvm keeps of the KVM_RUN returns",
    "Vcpu.kick": "writes kvm_run.immediate_exit and signals the thread inside KVM_RUN",
    "Irqfd.trigger": "a write to the eventfd KVM_IRQFD registered",
    "Irqfd.wait_resample": "a read of the resample eventfd",
    "Ioeventfd.wait": "a read of the eventfd KVM_IOEVENTFD registered",
    "Stats.names": "the descriptors read once from the stats fd",
    "Stats.descriptor": "likewise",
    "Stats.read": "a pread of the stats fd's data block",
    "Stats.delta": "two such preads around a block",
    "Kvm.describe": "the name used in messages, from Python attributes",
    "Vm.describe": "likewise",
    "Vcpu.describe": "likewise",
    "Stats.describe": "likewise",
    "Userfaultfd.read_fault": "a read of the userfaultfd",
    "Userfaultfd.fd": "the fd number",
    "Userfaultfd.close": "close(2)",
    "PageProvider.read": "a copy out of the mapping, faulting missing pages in",
    "PageProvider.close": "stops the serving thread and closes its Userfaultfd",
    "GuestMemory.provide_pages": "a PageProvider (userfaultfd) on the slot's mapping",
}
# GuestMemory's accessors read and write this process's mapping of guest RAM: no KVM call at all
# (slots is pykvm's own list).
MEMORY_ACCESSES = {f"GuestMemory.{name}" for name in (
    "slots", "host_pointer", "read", "write", "fill", "read_int", "write_int",
    "read_u8", "read_u16", "read_u32", "read_u64", "write_u8", "write_u16", "write_u32", "write_u64")}
NOT_IOCTLS.update(dict.fromkeys(MEMORY_ACCESSES, "an access to guest memory's host mapping"))
NO_EXAMPLE = {"Kvm.describe", "Vm.describe", "Vcpu.describe", "Stats.describe", "Userfaultfd.fd",
              "Userfaultfd.close", *MEMORY_ACCESSES}

EXAMPLE = re.compile(r"\n( *)Example::\n\n((?:\1 {4}.*\n|\n)+)")
IOCTL_NAMES = {request.macro for request in (*Ioctl, *UffdIoctl)}


def members() -> dict[str, object]:
    """Every public method and property each class defines itself, by ``Class.name``."""
    found = {}
    for cls in CLASSES:
        for name, value in vars(cls).items():
            if not name.startswith("_") and callable(getattr(value, "__get__", None)):
                found[f"{cls.__name__}.{name}"] = value
    return found


def function_of(member: object) -> object:
    """The function behind a method, property (its getter), cached_property or classmethod."""
    for attribute in ("fget", "func", "__func__"):
        if hasattr(member, attribute):
            return getattr(member, attribute)
    return member


def docstring(member: object) -> str:
    return inspect.getdoc(function_of(member)) or ""


def example_of(member: object) -> str | None:
    found = EXAMPLE.search(getattr(function_of(member), "__doc__", None) or "")
    return textwrap.dedent(found.group(2)) if found else None


EXAMPLES = {name: code for name, member in members().items() if (code := example_of(member))}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_the_example_runs(kvm_available, name):
    try:
        exec(compile(EXAMPLES[name], f"<{name} docstring example>", "exec"), {})
    except Exception as exc:
        pytest.fail(f"the docstring example of {name} failed: {type(exc).__name__}: {exc}\n{EXAMPLES[name]}")


@pytest.mark.host_independent
def test_every_member_names_its_ioctl_and_has_an_example():
    found = members()
    assert set(NOT_IOCTLS) <= set(found), set(NOT_IOCTLS) - set(found)     # no stale allow-list entry
    missing = sorted(set(found) - set(EXAMPLES) - NO_EXAMPLE)
    assert not missing, f"members without an Example:: block: {missing}"
    unnamed = []
    for name, member in found.items():
        first = re.match(r"``((?:KVM|UFFDIO)_[A-Z0-9_]+)", docstring(member))
        if name not in NOT_IOCTLS and not (first and first.group(1) in IOCTL_NAMES):
            unnamed.append(name)
    assert not unnamed, f"members whose docstring does not start with the ioctl's name: {unnamed}"


@pytest.mark.host_independent
def test_the_checker_sees_a_member_without_an_example():
    class Bare:
        def get_regs(self):
            """``KVM_GET_REGS``: no example here."""

    assert example_of(Bare.get_regs) is None
    assert example_of(Vcpu.regs) is not None and "vcpu.regs" in example_of(Vcpu.regs)
