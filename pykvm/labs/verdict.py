"""The verdict of ``labs check``, made in the checker's own process from evidence the student's cannot forge.

Why this exists: KVM binds a VM to the process that created it, so the
student's code, its VMs and the checker's scenarios share one process (the
child, :mod:`pykvm.labs.child`). Anything that process says can be the
student's: it can write the report socket, patch ``json``, pykvm or the
checker's trace, read the seed from its arguments, and write guest memory.
So what the child reports is a diagnosis (why a step failed, what it saw) and
the runner (:mod:`pykvm.labs.runner`) decides each step itself.

Threat model
------------
The student controls the child: its Python objects, its fds, its memory, its
processes. The student does not control the kernel, nor the runner's process.

A step passes only when

1. the child reports it passed (a failure it reports is believed: forging one
   gains nothing), and its report is well formed, about the step the runner
   asked for, once (else: "invalid report" / "report not from the checker");
2. at least one vCPU of the child did run: a stats fd the runner verified
   (below) shows ``exits > 0``; and
3. the step's own rule (:attr:`pykvm.labs.framework.Step.evidence`) accepts
   what the runner holds:

   * KVM's binary statistics of every vCPU the child created, per scenario.
     The checker's hook on ``Vcpu.__init__`` opens ``KVM_GET_STATS_FD`` and
     sends the fd over the report socket (``SCM_RIGHTS``); the runner accepts
     it only if ``/proc/self/fd`` names KVM's anonymous inode
     (``anon_inode:kvm-vcpu-stats:N``), which no other code can create, and
     the fd's stats id (``kvm-PID/vcpu-N``) names a process of the child's
     tree. Only KVM writes those counters (``exits``, ``io_exits``,
     ``halt_exits``, ``irq_injections``, ``nmi_injections``,
     ``halt_wakeup``), and the fd keeps the VM alive after the student closed
     it, so the runner reads them after each step, from its own process.
   * the injections, streamed by the checker's hook as they are made (kind,
     vector, RIP): rewriting the child's trace afterwards changes nothing the
     runner holds.
   * the task, drawn again in the runner from the seed
     (:func:`pykvm.labs.framework.task_random`): random vectors, counts and
     destinations that KVM's counters must match.

Which steps have rules of their own
-----------------------------------
Labs 1 (exits and the hlt), 2 (the injection; the main program's random
number of exits), 4, 5 and 6 (each KVM_INTERRUPT, as made and as KVM
injected it), 7 (task.count NMIs; the RIP each was raised at), 9 and 12
(KVM's injections: the random number of pulses and level requests; the
timers' ticks), 10 (injections on the random destination vCPU only;
``halt_wakeup``) and 13 (the IPIs and the NMI IPI). Lab 3's exceptions, lab
8's events, lab 11's kicks and lab 14's requests, and the steps that judge
memory or registers only (lab 2's IVT, lab 13's INIT/SIPI), rest on rule 2
and the child's word.

What this does not stop
-----------------------
* Driving a real VM to the counters a rule asks for without the lab's method
  (e.g. lab 7: ``task.count`` NMIs taken, but raised outside the handler by a
  patched hook that streams false RIPs): the counters prove that KVM did the
  thing, the child's diagnostics judge how, and the student can patch those.
* Writing the guest's log in guest memory directly: the child's checks read
  it, and a memory the runner shared with the child would not help (nothing
  shows the runner which memory KVM maps for the guest). The counters still
  must agree, but they count injections, not their vectors.
* Making KVM's counters move some other way. A red-team trial (2026-12-07)
  passed every step of all 14 labs, in ``labs check`` and ``labs grade``,
  with a ``lab.py`` alone that patches ``json`` as above and

  - streams injection reports of its own through the checker's reporter
    (vector, ready, forced and RIP are the child's word; KVM's
    ``irq_injections`` counts any vector: a raw ``KVM_INTERRUPT`` of another
    vector, made while the guest was not ready, passed labs 4-6);
  - made a VM of its own take interrupts or NMIs inside a step: the hook
    filed its vCPU under the running scenario, and the rules of labs 9, 12
    and 13 added up every vCPU filed there. The runner now refuses a
    scenario with vCPUs of more than one VM (two with one id:
    ``tests/labs_cheats/own_vm_takes_the_interrupts.py``); a student who also
    patches the hook so that only the own VM's vCPUs are reported still gets
    through;
  - meets a rule's thresholds without the lab's act (lab 1: any guest with
    three exits and a ``hlt``, the IN never answered; lab 2: the checker's
    own handler stub taking the injection; lab 10: ``signal_msi`` in place of
    the route and the irqfd).

  Closing the rest needs evidence of which vector went where by which path, which
  KVM's statistics do not hold (its trace events do, where the runner may read
  tracefs); it is not done. The checker stops honest mistakes and the tricks
  of ``tests/labs_cheats/``, not a student who reads and patches it.
* Forging the result of a step without a rule of its own once any vCPU of
  the child ran (rule 2 holds for the whole child).
* Creating a VM in a process of its own and handing the runner its stats fd
  under another scenario's name: it still has to do the work there.
* Reading the seed (it is in the child's arguments) or the task: the task is
  the student's anyway; what is random is what KVM must count.
* Where the host gives the child no PID and user namespaces (no ``unshare``,
  or unprivileged user namespaces disabled), the student's code runs as the
  runner's user and can signal or ptrace it: the checklist then says so
  (:attr:`pykvm.labs.runner.Report.isolated`). A student who is root on the
  host is out of scope.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

from ..core.constants import Cap
from ..core.errors import PyKvmError
from ..core.stats import Stats
from ..core.system import Kvm
from ..hosts import HostInfo
from .framework import Fail, Step, task_random

_VCPU_STATS_LINK = re.compile(r"anon_inode:kvm-vcpu-stats:(\d+)$")
_VCPU_STATS_ID = re.compile(r"kvm-(\d+)/vcpu-(\d+)$")


@dataclasses.dataclass
class VcpuStats:
    """A vCPU's stats fd, verified as KVM's own, from the scenario ``key`` of the child."""

    key: str
    vcpu: int
    stats: Stats

    def counters(self) -> dict[str, int]:
        """Every plain counter now (histograms left out)."""
        return {name: value for name, value in self.stats.read().items() if isinstance(value, int)}


@dataclasses.dataclass(frozen=True)
class Injection:
    """A KVM_INTERRUPT or KVM_NMI as the checker's hook streamed it when it was made."""

    key: str
    vcpu: int
    kind: str
    vector: int
    forced: bool
    ready: int
    if_flag: int
    rip: int


def verified_stats(fd: int, tree: set[int]) -> tuple[Stats | None, str]:
    """``fd`` as :class:`Stats` if KVM made it for a vCPU of a process in ``tree``; else None and why.

    Takes ownership of ``fd`` either way.
    """
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        os.close(fd)
        return None, f"an fd the runner cannot inspect ({exc.strerror})"
    if not _VCPU_STATS_LINK.match(link):
        os.close(fd)
        return None, f"{link!r}, not a vCPU stats fd made by KVM"
    try:
        stats = Stats(fd)
    except (PyKvmError, OSError) as exc:
        os.close(fd)
        return None, f"a stats fd that does not read as one ({exc})"
    match = _VCPU_STATS_ID.match(stats.id)
    if not match or int(match.group(1)) not in tree:
        stats.close()
        return None, f"the stats of {stats.id!r}, a VM made by no process of this check"
    return stats, ""


class Evidence:
    """What the runner holds about one child: its vCPUs' stats fds and its injections, by scenario."""

    def __init__(self) -> None:
        self.vcpus: list[VcpuStats] = []
        self.injections: list[Injection] = []

    def add_vcpu(self, key: str, stats: Stats) -> None:
        match = _VCPU_STATS_ID.match(stats.id)
        self.vcpus.append(VcpuStats(key, int(match.group(2)) if match else -1, stats))

    def add_injection(self, injection: Injection) -> None:
        self.injections.append(injection)

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.stats.close()
        self.vcpus.clear()


class Verdict:
    """What a step's evidence rule gets: the task's randomness, the host, and the evidence."""

    def __init__(self, seed: int, host: HostInfo, evidence: Evidence) -> None:
        self.seed = seed
        self.host = host
        self.evidence = evidence

    def random(self, key: str):
        """The generator the child drew scenario ``key``'s task from."""
        return task_random(self.seed, key)

    def counters(self, key: str) -> list[dict[str, int]]:
        """KVM's counters of each vCPU scenario ``key`` created, by vCPU id.

        Fail if it created none, or vCPUs of more than one VM (two with one id): every scenario runs one VM, and
        the counters of another (a VM of the student's own, made to take interrupts) would count as the task's.
        """
        vcpus = sorted((v for v in self.evidence.vcpus if v.key == key), key=lambda v: v.vcpu)
        if not vcpus:
            raise Fail(f"KVM's record of the run of {key}() is missing: the runner received no stats fd of a "
                       f"vCPU created in it (was the checker's hook on pykvm's Vcpu replaced?)")
        ids = [v.vcpu for v in vcpus]
        if len(set(ids)) != len(ids):
            raise disagree(f"{key}() created vCPUs of more than one VM (vCPU ids {ids}); the checker counts what "
                           f"KVM did in the task's VM only", by="the vCPUs KVM made")
        return [v.counters() for v in vcpus]

    def injections(self, key: str, kind: str) -> list[Injection]:
        """The ``kind`` ("interrupt", "nmi") injections streamed during scenario ``key``, in order."""
        return [i for i in self.evidence.injections if i.key == key and i.kind == kind]


@functools.cache
def stats_offered() -> bool:
    """Whether this host's KVM gives stats fds (``KVM_CAP_BINARY_STATS_FD``), the evidence every step needs."""
    try:
        with Kvm() as kvm:
            return bool(kvm.check_extension(Cap.BINARY_STATS_FD))
    except (OSError, PyKvmError):
        return False


@functools.cache
def posts_interrupts() -> bool:
    """Whether this host's KVM posts interrupts (kvm_intel's APICv, kvm_amd's AVIC).

    A posted interrupt reaches the guest without KVM's injection path, which is what counts
    ``irq_injections``: a rule on in-kernel irqchip deliveries cannot ask for that count there.
    """
    for parameter in ("kvm_intel/parameters/enable_apicv", "kvm_amd/parameters/avic"):
        path = Path("/sys/module") / parameter
        if path.is_file() and path.read_text().strip() in ("Y", "1"):
            return True
    return False


def delivered(verdict: Verdict, key: str, at_least: int) -> list[int]:
    """Each vCPU's ``irq_injections`` in scenario ``key``; Fail unless their sum is ``at_least`` (or posted)."""
    counted = [c["irq_injections"] for c in verdict.counters(key)]
    if sum(counted) < at_least and not posts_interrupts():
        raise disagree(f"during {key}() KVM injected {sum(counted)} interrupts; the task makes at least {at_least}")
    return counted


def injected_once(verdict: Verdict, key: str, vector: int, forced: bool = False) -> str:
    """Fail unless scenario ``key`` made one KVM_INTERRUPT of ``vector`` and KVM injected it.

    Made as the checker's hook saw it then: when ready (or ``forced`` while not ready). KVM counts
    an injection again when an exit cuts its delivery short and it re-injects: at least once.
    """
    wanted = (vector, forced, 0 if forced else 1)
    made = [(i.vector, i.forced, i.ready) for i in verdict.injections(key, "interrupt")]
    counted = [c["irq_injections"] for c in verdict.counters(key)]
    if made != [wanted] or len(counted) != 1 or counted[0] < 1:
        shown = [(hex(v), f, r) for v, f, r in made]
        raise disagree(f"{key}() made the KVM_INTERRUPTs {shown} (vector, forced, ready) and KVM counted "
                       f"{counted} injections; the task asks for {[(hex(vector), forced, wanted[2])]}, "
                       f"injected by KVM")
    return f"KVM injected {vector:#x}"


def disagree(what: str, by: str = "KVM's own counters") -> Fail:
    """The failure of a step whose child said "passed" while the runner's evidence (``by``) says otherwise."""
    return Fail(f"{by} disagree with the report: {what}",
                "the checker judges what KVM counted and what it saw happen, not what your process reports")


def judge(step: Step, verdict: Verdict) -> str:
    """The runner's own judgement of a step the child reported passed: its detail, or Fail."""
    ran = [v for v in verdict.evidence.vcpus if v.counters().get("exits", 0) > 0]
    if not ran and not stats_offered():
        raise Fail("this host's KVM has no KVM_CAP_BINARY_STATS_FD (Linux 5.14): the checker has no counters of "
                   "KVM's own to judge by, so it passes nothing", "run the lab on a host with Linux 5.14 or later")
    if not ran:
        raise disagree("no vCPU of this check ever ran (no verified stats fd with exits > 0)")
    rule: Callable[[Verdict], str] | None = step.evidence
    return rule(verdict) if rule is not None else ""
