"""Run a lab's checker against a student's file, each step under a deadline, in an isolated child.

Why this exists: ``check`` must always finish and print a checklist that the
student's code cannot write. The steps run in a child (:mod:`pykvm.labs.child`):
``python -I -B`` (no bytecode written beside the student's file) in an empty
working directory, and where the host allows (:func:`isolation`) in PID, mount and user namespaces of its own, so the
student's code can neither see nor signal this process and every process it
starts dies with the child. The child limits its memory, CPU time and tasks (forks) before the
student's code runs. This side reads the child's reports (JSON datagrams on a
socket, with KVM's stats fds attached), the student's output (the first
:data:`OUTPUT_LIMIT` bytes kept, the rest counted, control characters escaped)
and enforces a deadline per step. After each step it ends every process the
step started and decides the step itself (:mod:`pykvm.labs.verdict`): the
child's word is only its diagnosis. A hang, a stop (SIGSTOP), a crash, a closed
or forged report channel fails the step it happened in, with its cause; a fresh
child goes on at the next step, told which of the student's runs is broken so
the steps that judge it fail at once. Every socket, pipe, directory and
process is released before :func:`check` returns, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..core.vm import fd_links
from ..hosts import HostInfo, detect
from .child import GO, TASK_LIMIT
from .framework import Fail, Lab
from .verdict import Evidence, Injection, Verdict, judge, verified_stats

DEFAULT_DEADLINE = float(os.environ.get("PYKVM_LAB_DEADLINE", "30"))
OUTPUT_LINES = 40          # lines of the student's output shown under the checklist
OUTPUT_LIMIT = 64 << 10    # bytes of the student's output kept (the rest is counted)
TAIL_BYTES = 4096          # bytes of a child's last output kept as evidence of a crash
MESSAGE_LIMIT = 64 << 10   # bytes of one report datagram; a longer one is an invalid report
# Reports one child may send, at most: more is a flood, not a checker (its fds would pin VMs here).
MAX_VCPUS, MAX_INJECTIONS, MAX_NESTED = 256, 1 << 16, 64
STARTUP = 120.0            # seconds a child may take to import pykvm (slow on emulated hosts)
GRACE = 2.0                # seconds a child that closed its report channel has to exit
# Seconds of silence during a step after which the checker looks whether any of the child's processes still
# holds the report channel: with namespaces ``unshare`` keeps its copy, so closing it gives no end-of-file.
CHANNEL_POLL = 0.5
WALKS = 100                # walks of a process tree at most while stopping it (each stops what it found)
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])     # where this pykvm is imported from
# The child's program: this very pykvm, whatever the student's folder or the environment hold.
CHILD_PROGRAM = (f"import sys; sys.path.insert(0, {PACKAGE_ROOT!r}); from pykvm.labs.child import main; "
                 f"sys.exit(main(sys.argv[1:]))")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


def escaped(text: str) -> str:
    """``text`` with control characters (escape sequences, carriage returns, bidi marks) shown as ``\\xNN``."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


@functools.cache
def isolation() -> tuple[str, ...]:
    """The command prefix that starts the child in its own PID, mount and user namespaces; () if the host refuses.

    The child then sees only its own processes (its own /proc) and cannot signal
    this one; when its PID 1 ends the kernel ends everything in it.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    prefix = (unshare, "--pid", "--fork", "--kill-child", "--mount-proc") + (("--user",) if os.geteuid() else ())
    probe = [*prefix, sys.executable, "-I", "-S", "-c", "import os; os.close(os.open('/dev/kvm', os.O_RDWR))"]
    try:
        done = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=STARTUP)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if done.returncode == 0 else ()


PIDS_HIERARCHY = Path("/sys/fs/cgroup/pids")      # where cgroup v1 mounts its pids controller


@functools.cache
def _pids_parent() -> Path | None:
    """This process's own cgroup, if this process may make pids-capped cgroups below it: in the v1 pids
    hierarchy, else in the unified (v2) one where its pids controller is, or can be, enabled for children."""
    with contextlib.suppress(OSError):
        lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
        for _, controllers, path in lines:
            if "pids" in controllers.split(","):
                own = PIDS_HIERARCHY / path.lstrip("/")
                return own if os.access(own, os.W_OK) else None
        unified = _unified_mount()
        for hierarchy, controllers, path in lines:
            if hierarchy == "0" and controllers == "" and unified is not None:
                return _pids_enabled_below(unified / path.lstrip("/"))
    return None


def _unified_mount() -> Path | None:
    """Where the unified (cgroup v2) hierarchy is mounted, if it is."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields, _, filesystem = line.partition(" - ")
            if filesystem.split(" ", 1)[0] == "cgroup2":
                return Path(fields.split(" ")[4])
    return None


def _pids_enabled_below(own: Path) -> Path | None:
    """``own`` (a v2 cgroup) if its children get the pids controller, enabling it where allowed (in the root
    cgroup, or one without processes of its own: v2's rule); None where they cannot."""
    try:
        if "pids" not in (own / "cgroup.subtree_control").read_text().split():
            if "pids" not in (own / "cgroup.controllers").read_text().split():
                return None
            (own / "cgroup.subtree_control").write_text("+pids")
    except OSError:
        return None
    return own if os.access(own, os.W_OK) else None


def tasks_capped() -> bool:
    """Whether a fork bomb in the student's code meets a cap: RLIMIT_NPROC (never binding root) or a pids cgroup."""
    return os.geteuid() != 0 or _pids_parent() is not None


def _pids_cgroup() -> Path | None:
    """A new pids cgroup below this process's own, capped at :data:`TASK_LIMIT` tasks; None if none can be made.

    Why: the child's RLIMIT_NPROC never binds root, so as root only a cgroup's ``pids.max`` stops a fork
    bomb before it fills the host's PID table.
    """
    parent = _pids_parent()
    if parent is None:
        return None
    try:
        cgroup = Path(tempfile.mkdtemp(prefix="pykvm-lab-", dir=parent))
    except OSError:
        return None
    try:
        (cgroup / "pids.max").write_text(str(TASK_LIMIT))
    except OSError:
        cgroup.rmdir()
        return None
    return cgroup


def _remove_cgroup(cgroup: Path, timeout: float = 5.0) -> None:
    """Remove a check's pids cgroup once its processes have ended: the kernel refuses (EBUSY) until the last
    one is reaped, which in a PID namespace its init does after this side saw them killed."""
    ends = time.monotonic() + timeout
    while True:
        try:
            cgroup.rmdir()
            return
        except OSError:
            if time.monotonic() >= ends:
                return
            time.sleep(0.01)


@dataclasses.dataclass(frozen=True)
class StepResult:
    index: int
    title: str
    passed: bool
    detail: str = ""
    hint: str = ""


@dataclasses.dataclass(frozen=True)
class Report:
    lab: Lab
    student_file: Path
    seed: int
    host: str
    results: tuple[StepResult, ...]
    output: str = ""            # what the student's code printed (escaped; the first OUTPUT_LIMIT bytes)
    isolated: bool = True       # whether the child ran in namespaces of its own

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)


def _ended(status: int | None) -> str:
    """How a process ended, from ``os.waitstatus_to_exitcode``'s value (None: the runner ended it)."""
    if status is None:
        return "was ended by the checker"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        meaning = {"SIGSEGV": " (segmentation fault: memory access the process may not make)",
                   "SIGKILL": " (killed)", "SIGABRT": " (aborted)", "SIGBUS": " (bus error)",
                   "SIGXCPU": " (it used up its CPU time limit)"}
        return f"was killed by {name}{meaning.get(name, '')}"
    return f"exited with status {status} before reporting"


class _Output:
    """The student's output: the first :data:`OUTPUT_LIMIT` bytes of the check kept, the rest counted."""

    def __init__(self) -> None:
        self.kept = bytearray()
        self.dropped = 0
        self.tail = b""              # the current child's last TAIL_BYTES

    def feed(self, chunk: bytes) -> None:
        room = max(0, OUTPUT_LIMIT - len(self.kept))
        self.kept += chunk[:room]
        self.dropped += len(chunk) - len(chunk[:room])
        self.tail = (self.tail + chunk)[-TAIL_BYTES:]

    def last_lines(self, lines: int = 6) -> str:
        return escaped("\n".join(self.tail.decode(errors="replace").strip().splitlines()[-lines:]))

    def text(self) -> str:
        shown = escaped(self.kept.decode(errors="replace").strip())
        return shown + (f"\n... and {self.dropped} more bytes, not shown" if self.dropped else "")


class Forged(Exception):
    """The child's report broke the protocol: the reason says how."""


def _string(message: dict, name: str) -> str:
    value = message.get(name, "")
    if not isinstance(value, str):
        raise Forged(f"invalid report: {name} is {type(value).__name__}, not text")
    return escaped(value)


def _integer(message: dict, name: str) -> int:
    value = message.get(name)
    if type(value) is not int:
        raise Forged(f"invalid report: {name} is {escaped(repr(value))[:40]}, not an integer")
    return value


class _Child:
    """One child process running steps from ``start``: its reports, output, evidence and end."""

    def __init__(self, lab: Lab, student_file: Path, seed: int, start: int, broken: dict[str, str],
                 python: str, deadline: float, output: _Output) -> None:
        self.output = output
        self.evidence = Evidence()
        self.workdir = tempfile.TemporaryDirectory(prefix="pykvm-lab-")
        self.socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel = f"socket:[{os.fstat(theirs.fileno()).st_ino}]"     # the child's end, in /proc/PID/fd
        self.status_read, status_write = os.pipe()
        self.output_read, output_write = os.pipe()
        cpu_seconds = int(STARTUP + deadline * (len(lab.steps) - start)) + 1
        self.pids_cgroup = _pids_cgroup()
        try:
            self.process = subprocess.Popen(
                [*isolation(), python, "-I", "-B", "-c", CHILD_PROGRAM, "--lab", str(lab.number),
                 "--file", str(student_file), "--seed", str(seed), "--start", str(start),
                 "--report-fd", str(theirs.fileno()), "--status-fd", str(status_write),
                 "--cpu-seconds", str(cpu_seconds), "--pids-cgroup", str(self.pids_cgroup or ""),
                 "--broken", json.dumps(broken)],
                stdin=subprocess.DEVNULL, stdout=output_write, stderr=output_write,
                pass_fds=(theirs.fileno(), status_write), start_new_session=True, cwd=self.workdir.name)
        except BaseException:
            self._release()
            raise
        finally:
            theirs.close()
            os.close(status_write)
            os.close(output_write)
        self.own: set[int] = set()           # the checker's processes (the child before the student's code)
        self.status: int | None = None       # how the worker ended (os.waitstatus_to_exitcode), once known

    # -- the processes ----------------------------------------------------------------------
    def tree(self) -> list[int]:
        """The child and every process below it (all in its namespace, or all it forked), then those of its
        pids cgroup that left it (without a namespace, a daemon's orphans are this process's children)."""
        below = process_tree(self.process.pid)
        return below + [pid for pid in self._cgroup_members() if pid not in below]

    def _cgroup_members(self) -> list[int]:
        if self.pids_cgroup is None:
            return []
        try:
            return [int(pid) for pid in (self.pids_cgroup / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def note_own(self) -> None:
        self.own = set(self.tree())

    def end_leftovers(self) -> None:
        """End every process the student's code started (the checker's own stay)."""
        _kill(lambda: [pid for pid in self.tree() if pid not in self.own])

    def channel_closed(self) -> bool:
        """Whether no process below the child's first one (``unshare`` keeps its copy) holds the report channel."""
        return not any(holds(pid, self.channel) for pid in self.tree()[1 if isolation() else 0:])

    def stopped(self) -> bool:
        return any(_state(pid) in ("t", "T") for pid in process_tree(self.process.pid))

    # -- the reports ----------------------------------------------------------------------------
    def next_message(self, deadline: float) -> dict | None:
        """The next report; None once the channel is closed; TimeoutError past ``deadline``; Forged."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self.socket.fileno(), self.output_read], [], [], remaining)
            if self.output_read in ready:
                chunk = os.read(self.output_read, 65536)
                if chunk:
                    self.output.feed(chunk)
            if self.socket.fileno() in ready:
                return self._receive()

    def _receive(self) -> dict | None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.socket, MESSAGE_LIMIT, 4)
        except ConnectionResetError:
            # The child ended with our "go" unread: Linux reports that once, before the reports still
            # queued (the child's end is closed, so this receive cannot block).
            data, fds, flags, _ = socket.recv_fds(self.socket, MESSAGE_LIMIT, 4)
        if not data and not fds:
            return None
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise Forged(f"invalid report: a message longer than {MESSAGE_LIMIT} bytes")
            try:
                message = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                raise Forged(f"invalid report: {escaped(repr(data[:60]))} is not one JSON message") from None
            if not isinstance(message, dict) or not isinstance(message.get("event"), str):
                raise Forged(f"invalid report: {escaped(repr(message))[:80]} names no event")
            if message["event"] == "vcpu":
                given, fds = fds, []
                self._accept_vcpu(message, given)
            elif fds:
                raise Forged(f"report not from the checker: fds attached to a {escaped(message['event'])!r} report")
            return message
        finally:
            for fd in fds:
                os.close(fd)

    def _accept_vcpu(self, message: dict, fds: list[int]) -> None:
        """Keep the one fd a vCPU report carries if KVM made it; it is closed otherwise."""
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise Forged(f"report not from the checker: a vCPU report with {len(fds)} fds")
        if len(self.evidence.vcpus) >= MAX_VCPUS:
            os.close(fds[0])
            raise Forged(f"invalid report: more than {MAX_VCPUS} vCPUs")
        stats, problem = verified_stats(fds[0], set(self.tree()))
        if stats is None:
            raise Forged(f"report not from the checker: the fd sent as KVM's vCPU statistics is {problem}")
        self.evidence.add_vcpu(_string(message, "key"), stats)

    def accept_injection(self, message: dict) -> None:
        if len(self.evidence.injections) >= MAX_INJECTIONS:
            raise Forged(f"invalid report: more than {MAX_INJECTIONS} injections")
        self.evidence.add_injection(Injection(
            _string(message, "key"), _integer(message, "vcpu"), _string(message, "kind"),
            _integer(message, "vector"), bool(message.get("forced")), _integer(message, "ready"),
            _integer(message, "if_flag"), _integer(message, "rip")))

    def send_go(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.send(GO)

    def wait_exit(self, timeout: float) -> bool:
        """Whether the worker ended within ``timeout`` (its status, when known, in ``self.status``)."""
        ends = time.monotonic() + timeout
        while time.monotonic() < ends:
            if isolation() and self._read_status():
                return True
            if not isolation() and self.process.poll() is not None:
                self.status = self.process.returncode
                return True
            time.sleep(0.01)
        return False

    def _read_status(self) -> bool:
        ready, _, _ = select.select([self.status_read], [], [], 0)
        if ready:
            raw = os.read(self.status_read, 32)
            if raw.strip().isdigit():
                self.status = os.waitstatus_to_exitcode(int(raw))
            return True
        return False

    # -- the end --------------------------------------------------------------------------------
    def close(self) -> None:
        """End every process of the child and release everything."""
        tree = _kill(self.tree)
        self.process.wait()
        _gone(tree)
        if not isolation():
            _reap_adopted(tree)
        self._drain()
        self._release()

    def _drain(self) -> None:
        while select.select([self.output_read], [], [], 0)[0]:
            chunk = os.read(self.output_read, 65536)
            if not chunk:
                return
            self.output.feed(chunk)

    def _release(self) -> None:
        self.evidence.close()
        self.socket.close()
        os.close(self.status_read)
        os.close(self.output_read)
        self.workdir.cleanup()
        if self.pids_cgroup is not None:
            _remove_cgroup(self.pids_cgroup)


def _stat(pid: int | str) -> list[str]:
    """``/proc/PID/stat``'s fields after the command name (state, parent, ...); [] once ``pid`` has gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()
    except OSError:
        return []


def holds(pid: int, target: str) -> bool:
    """Whether process ``pid`` has a file descriptor open on ``target`` (what ``/proc/PID/fd/N`` links to).

    By :func:`pykvm.core.vm.fd_links`, which skips a descriptor closed while it looks: code that opens and
    closes descriptors all the time (a VM a measurement) must not look as if it had closed the one it keeps."""
    return target in fd_links(pid).values()


def _state(pid: int) -> str | None:
    """``/proc/PID/stat``'s state letter ("T" stopped, "t" traced, "Z" zombie...); None once ``pid`` has gone."""
    return next(iter(_stat(pid)), None)


def _children_by_scan(pid: int) -> list[int]:
    """``pid``'s children, from every process's parent field (kernels without CONFIG_PROC_CHILDREN)."""
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and _stat(entry)[1:2] == [str(pid)]]


def _children(pid: int) -> list[int]:
    """``pid``'s children, from its threads' ``/proc/PID/task/TID/children``: the few files of one process
    tree, where a scan of /proc reads every process of the host (8 ms here, 40 times a check)."""
    if not _CHILDREN_LISTED:
        return _children_by_scan(pid)
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/task/{task}/children") as children:
                found += map(int, children.read().split())
    return found


_CHILDREN_LISTED = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def process_tree(root: int) -> list[int]:
    """``root`` (if it runs) and its descendants."""
    found, waiting = [], [root] if _state(root) is not None else []
    while waiting:
        pid = waiting.pop()
        found.append(pid)
        waiting += _children(pid)
    return found


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """SIGINT held back meanwhile and raised again after the block: starting and ending a child (a check) is
    never cut short. A process started meanwhile inherits SIGINT blocked.

    Blocking SIGINT in this thread is not enough: the kernel then gives the signal to another thread of the
    process (pytest's, a vCPU's), and Python raises KeyboardInterrupt in the main thread all the same (a
    child started that way was left running). So the main thread's Python handler only notes it meanwhile.
    """
    if threading.current_thread() is not threading.main_thread():
        yield                           # KeyboardInterrupt is only ever raised in the main thread
        return
    noted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)      # (one held back here is noted too)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if noted:
            signal.raise_signal(signal.SIGINT)                     # now, to whatever handled it before


@contextlib.contextmanager
def _started(*args: Any) -> Iterator[_Child]:
    """A child started with ``_Child(*args)``, ended and released however the block ends, Ctrl-C included.

    The child inherits SIGINT blocked: it runs in a session of its own, where a terminal's Ctrl-C does not
    reach it anyway.
    """
    child = None
    try:        # (a Ctrl-C held back meanwhile is raised as SIGINT is unblocked: the child is closed then too)
        with sigint_held():
            child = _Child(*args)
        yield child
    finally:
        if child is not None:
            with sigint_held():
                child.close()


def _kill(walk: Callable[[], list[int]]) -> list[int]:
    """Stop every process ``walk()`` finds, walking again until it finds none not yet stopped, then kill them
    all; the processes killed.

    SIGSTOP first, so a forking process cannot outrun the walk, and a walk of stopped processes is exact
    (proc(5): a children list is reliable only while its processes are stopped). One walk was not: a check
    Ctrl-C'd as ``unshare`` forked its child left that child running, unseen by the walk, orphaned before it
    set its parent-death signal. A walk finds at most the check's task cap, so this ends; a bound keeps it so.
    """
    stopped: list[int] = []
    for _ in range(WALKS):
        new = [pid for pid in walk() if pid not in stopped]
        if not new:
            break
        _signal(new, signal.SIGSTOP)
        stopped += new
    _signal(stopped, signal.SIGKILL)
    return stopped


def end_tree(root: int) -> list[int]:
    """Stop, then kill, ``root`` and every process below it (:func:`_kill`); the processes killed."""
    return _kill(lambda: process_tree(root))


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _gone(pids: list[int], timeout: float = 5.0) -> None:
    """Wait until the killed ``pids`` have left (a PID namespace's processes are killed after its init ends)."""
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if all(_state(pid) in (None, "Z") for pid in pids):
            return
        time.sleep(0.01)


def _reap_adopted(pids: list[int]) -> None:
    """Reap those of the killed ``pids`` this process adopted (:func:`_adopting`): a zombie holds its pids cgroup."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def _adopting() -> Iterator[None]:
    """Without namespaces: make this process adopt the child's orphans (PR_SET_CHILD_SUBREAPER) meanwhile."""
    if isolation():
        yield
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int()
    libc.prctl(37, ctypes.byref(was), 0, 0, 0)           # PR_GET_CHILD_SUBREAPER
    libc.prctl(36, 1, 0, 0, 0)                           # PR_SET_CHILD_SUBREAPER
    me = os.getpid()
    before = set(_children(me))
    try:
        yield
    finally:
        adopted = _kill(lambda: [pid for pid in _children(me) if pid not in before])
        for pid in adopted:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        libc.prctl(36, was.value, 0, 0, 0)


# A step stopped at its deadline is seldom about the step's own topic: say how to find where it hung.
HANG_HINT = ("code that never finishes is usually a run() loop waiting for an exit that never comes: print "
             "each exit with the guest's RIP (print(exit, hex(vcpu.regs.rip))) and look at the last ones; "
             "the same exit over and over (e.g. an OUT to port 0 at a growing RIP) means the guest is "
             "running where you did not put code: check the address you loaded it at and where the "
             "registers you set make it start")
CHANNEL_CLOSED = ("the process running your code closed the checker's report channel (os.closerange? "
                  "os.close?) and went on running; it was stopped")
FORGED_HINT = "the checklist comes from the checker's process; your code's reports do not count"


@dataclasses.dataclass
class _Run:
    """One child's run: where it is, what it reported, and why it stopped early (``problem``)."""

    start: int
    current: int | None = None
    expected: int = 0
    running: list[str] = dataclasses.field(default_factory=list)   # scenario keys, innermost last
    problem: str = ""
    hint: str = ""
    ready: bool = False


class _Checker:
    """The parent's side of one ``check``: children, their events, and each step's verdict."""

    def __init__(self, lab: Lab, student_file: Path, seed: int, deadline: float, python: str,
                 host: HostInfo) -> None:
        self.lab, self.student_file, self.seed = lab, student_file, seed
        self.deadline, self.python, self.host = deadline, python, host
        self.results: dict[int, StepResult] = {}
        self.broken: dict[str, str] = {}
        self.output = _Output()

    def run(self) -> tuple[StepResult, ...]:
        start, steps = 0, self.lab.steps
        while start < len(steps):
            run = _Run(start, expected=start)
            with _started(self.lab, self.student_file, self.seed, start, self.broken, self.python,
                          self.deadline, self.output) as child:
                self._follow(child, run)
            if not run.problem:
                break
            start = self._fail_early(run)
        return tuple(self.results.get(i, StepResult(i, step.title, False, "not run"))
                     for i, step in enumerate(steps))

    def _follow(self, child: _Child, run: _Run) -> None:
        limit = time.monotonic() + STARTUP
        self.output.tail = b""
        while True:
            try:
                polling = run.current is not None and isolation()
                message = child.next_message(min(limit, time.monotonic() + CHANNEL_POLL) if polling else limit)
                if message is None:
                    run.problem = self._closed(child)
                    return
                if self._handle(child, run, message):
                    return
            except TimeoutError:
                if time.monotonic() < limit:            # a silent step: is anyone still able to report?
                    if child.channel_closed():
                        run.problem = CHANNEL_CLOSED
                        return
                    continue
                run.problem = self._timeout(child, run)
                return
            except Forged as forged:
                run.problem, run.hint = str(forged), FORGED_HINT
                return
            if run.current is not None and message["event"] == "step":
                limit = time.monotonic() + self.deadline

    def _closed(self, child: _Child) -> str:
        if child.wait_exit(GRACE):
            return "the process running your code " + _ended(child.status)
        return CHANNEL_CLOSED

    def _timeout(self, child: _Child, run: _Run) -> str:
        if run.current is None:
            return f"the checker's process did not start within {STARTUP:g} s"
        if child.channel_closed():
            return CHANNEL_CLOSED
        if child.stopped():
            return (f"the process running your code was stopped (SIGSTOP or a debugger) and did not "
                    f"finish within {self.deadline:g} s; it was ended")
        return (f"did not finish within {self.deadline:g} s (a hang? an endless run() loop, or a guest "
                f"that never exits); it was stopped")

    def _handle(self, child: _Child, run: _Run, message: dict) -> bool:
        """Act on one report; True once the child is done."""
        kind = message["event"]
        if kind == "ready" and not run.ready:
            run.ready = True
            child.note_own()
            child.send_go()
        elif not run.ready:
            raise Forged(f"report not from the checker: {escaped(kind)!r} before the checker was ready")
        elif kind == "step":
            if _integer(message, "index") != run.expected or run.current is not None:
                raise Forged(f"report not from the checker: step {message['index']!r} announced while "
                             f"step {run.expected + 1} was next")
            run.current = run.expected
        elif kind == "begin":
            if len(run.running) >= MAX_NESTED:
                raise Forged(f"invalid report: more than {MAX_NESTED} scenarios inside each other")
            run.running.append(_string(message, "key"))
        elif kind == "end" and run.running:
            run.running.pop()
        elif kind == "injection":
            child.accept_injection(message)
        elif kind == "result":
            self._result(child, run, message)
        elif kind == "done" and run.expected == len(self.lab.steps) and run.current is None:
            return True
        elif kind not in ("vcpu", "end"):
            raise Forged(f"invalid report: unexpected {escaped(kind)!r}")
        return False

    def _result(self, child: _Child, run: _Run, message: dict) -> None:
        index = _integer(message, "index")
        if index != run.current:
            running = f"step {run.current + 1} runs" if run.current is not None else "no step runs"
            raise Forged(f"report not from the checker: a result for step {index + 1} while {running}"
                         if 0 <= index < len(self.lab.steps) else
                         f"invalid report: a result for step {index}; the lab has {len(self.lab.steps)}")
        step = self.lab.steps[index]
        passed, detail, hint = message.get("passed") is True, _string(message, "detail"), _string(message, "hint")
        child.end_leftovers()
        if passed:
            try:
                agreed = judge(step, Verdict(self.seed, self.host, child.evidence))
                detail = "; ".join(part for part in (detail, agreed) if part)
            except Fail as failure:
                passed, detail, hint = False, escaped(failure.reason), failure.hint or step.hint
        self.results[index] = StepResult(index, step.title, passed, detail, hint)
        run.current, run.expected = None, index + 1
        child.send_go()

    def _fail_early(self, run: _Run) -> int:
        """Fail the step a child stopped in; the step the next child starts at."""
        steps = self.lab.steps
        current = run.current if run.current is not None else run.expected
        if current >= len(steps):
            return len(steps)
        inside = [key for key in run.running if key != "import"]
        evidence = self.output.last_lines()
        problem = run.problem
        reason = problem + (f" (in the run of {inside[-1]}())" if inside else
                            " (while importing your file)" if run.running else "") + \
            (f"; its last output:\n{evidence}" if evidence else "")
        hint = run.hint or (HANG_HINT if problem.startswith(("did not finish", "the process running your "
                                                             "code was stopped")) else steps[current].hint)
        self.results[current] = StepResult(current, steps[current].title, False, reason, hint)
        for key in run.running:         # every step that judges these runs is "not checked"
            self.broken[key] = reason
        return current + 1


def check(lab: Lab, student_file: Path | str, seed: int | None = None, deadline: float = DEFAULT_DEADLINE,
          python: str = sys.executable, host: str = "") -> Report:
    """Run every step of ``lab`` against ``student_file``; never hangs, never raises for the student's code."""
    student_file = Path(student_file).resolve()
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    checker = _Checker(lab, student_file, seed, deadline, python, detect())
    with _adopting():
        results = checker.run()
    return Report(lab, student_file, seed, host, results, checker.output.text(), bool(isolation()))


def format_report(report: Report) -> str:
    """The checklist a student reads."""
    lab = report.lab
    lines = [f"Lab {lab.number}: {lab.title}",
             f"checking {report.student_file} on {report.host or 'this host'} (seed {report.seed}; "
             f"--seed {report.seed} repeats this run)", ""]
    if not report.isolated:
        lines[-1:] = ["(this host offers no PID and user namespaces: your code ran isolated less strictly)", ""]
    for result in report.results:
        mark = "PASS" if result.passed else "FAIL"
        lines.append(f"  [{mark}] {result.index + 1}. {result.title}")
        if result.passed and result.detail:
            lines.append(f"         {result.detail}")
        if not result.passed:
            for number, text in enumerate(result.detail.splitlines() or ["(no reason given)"]):
                lines.append(f"         {'why:  ' if number == 0 else '      '}{text}")
            if result.hint:
                lines.append(f"         hint: {result.hint}")
    if report.output:
        shown = report.output.splitlines()
        lines += ["", f"your code printed (the last {OUTPUT_LINES} lines at most):"]
        lines += [f"  | {line}" for line in shown[-OUTPUT_LINES:]]
    passed = sum(result.passed for result in report.results)
    lines += ["", f"{passed} of {len(report.results)} steps passed" +
              (": lab complete." if report.passed else ".")]
    return "\n".join(lines)


def check_here(number: int, student_file: str) -> None:
    """What a starter's ``if __name__ == "__main__"`` calls: check this file, print, exit with the verdict."""
    from . import get_lab
    report = check(get_lab(number), student_file, host=detect().name)
    print(format_report(report))
    sys.exit(0 if report.passed else 1)
