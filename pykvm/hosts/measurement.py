"""This host's probe outcomes, measured once per kernel, vendor module and module parameters, and cached.

Why this exists: what a host does depends on more than the vendor module's
name. kvm_intel loaded with ``ept=0 unrestricted_guest=0`` runs real mode in
vm86 and injects there through its instruction emulator, so NMI blocking and
KVM_INTERRUPT with IF=0 differ from the same module with its defaults. The
facts tests and tools branch on (:mod:`pykvm.hosts.facts`) are therefore the
outcomes of the probes (:mod:`pykvm.hosts.probes`) run on this host, not
pykvm's record (:mod:`pykvm.hosts.conformance`), which stays as the
documentation of what was measured where.

Measuring is cheap on hardware (under a second) but not under an emulator, so
the outcomes are cached in ``$XDG_CACHE_HOME/pykvm/host-facts/`` (default
``~/.cache/pykvm/host-facts/``), one file per :class:`HostKey`: the kernel
(release and build), the vendor module, its parameters
(``/sys/module/kvm_*/parameters/*``) and a digest of the probes' and guest
images' code. A change of any of them is a new key, so the next use measures
again. Files written under another kernel are removed; those of this kernel's
other keys stay, up to :data:`KEYS_PER_KERNEL` (two checkouts of pykvm, or a
module reloaded with other parameters and back, would otherwise remove each
other's file and measure again at every turn). ``python -m pykvm.doctor
--refresh`` measures and rewrites the file.

Each cached entry carries a seal: a digest of the key, the probe, its outcome
and what it saw. An entry whose seal does not match (edited by hand, or
written for another key) is never used: :func:`load` raises
:class:`HostFactsCacheError` naming the file, the entry and the fix, and the
doctor reports it beside its fresh measurement. Processes that load at once
(pytest-xdist workers) take a lock, so one of them measures and the others
read its result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import glob
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from ..core.errors import PyKvmError
from . import probes
from .conformance import EXPECTATIONS
from .probes.base import Observation, ProbeOutcome, Result
from .runner.cache import cache_root, prune, write_atomically
from .vendor import VendorModule, detect_vendor

CACHE_NAME = "host-facts"
FORMAT = "pykvm host facts v1"
REFRESH = "python -m pykvm.doctor --refresh"
# The code whose change makes every cached outcome stale: the probes and the guests they boot.
_PACKAGE = Path(__file__).resolve().parent.parent
KEYS_PER_KERNEL = 4        # cache files kept for one kernel: its keys measured last (code, module, parameters)
MEASURING_CODE = ("hosts/probes/*.py", "guests/*.py", "guests/images/*.bin", "guests/images/*.json")


class HostFactsCacheError(PyKvmError):
    """The cache of measured host facts holds an entry pykvm did not write for this host."""


@dataclasses.dataclass(frozen=True)
class HostKey:
    """What the probes' outcomes depend on: measured once per key."""

    kernel: str                    # release and build (uname -r, uname -v)
    module: str                    # the vendor module
    parameters: dict[str, str]     # "kvm_intel.ept": "N", ... (/sys/module/kvm_*/parameters/*)
    code: str                      # digest of the probes' and guest images' code

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    def describe_parameters(self) -> str:
        """``kvm_intel: enable_apicv=N ept=N ...``, or a note that the module exposes none."""
        if not self.parameters:
            return f"{self.module}: no module parameters exposed"
        return f"{self.module}: " + " ".join(f"{name.partition('.')[2]}={value}"
                                             for name, value in sorted(self.parameters.items()))


def _read_parameter(path: str) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError as exc:
        return f"<unreadable: {exc.strerror}>"


def module_parameters(sys_module: str = "/sys/module") -> dict[str, str]:
    """``/sys/module/kvm_*/parameters/*`` as ``{"kvm_intel.ept": "Y", ...}``."""
    found = {}
    for path in sorted(glob.glob(os.path.join(sys_module, "kvm_*", "parameters", "*"))):
        module = Path(path).parent.parent.name
        found[f"{module}.{Path(path).name}"] = _read_parameter(path)
    return found


def code_digest(package: Path = _PACKAGE) -> str:
    """A digest of the code that measures: a change to a probe or a guest image makes old outcomes stale."""
    digest = hashlib.sha256()
    for pattern in MEASURING_CODE:
        for path in sorted(package.glob(pattern)):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def host_key(vendor: VendorModule | None = None, sys_module: str = "/sys/module") -> HostKey:
    """This machine's key."""
    uname = os.uname()
    return HostKey(f"{uname.release} {uname.version}", (vendor or detect_vendor(sys_module)).value,
                   module_parameters(sys_module), code_digest())


def seal(key: HostKey, probe: str, outcome: str | None, detail: str) -> str:
    """The seal of one cached entry: it binds the outcome to the probe and the key it was measured under."""
    text = json.dumps([key.digest, probe, outcome, detail])
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(key: HostKey) -> Path:
    return cache_root(CACHE_NAME) / f"{key.module}-{key.digest[:16]}.json"


def outcome_of(probe: str, phrase: str | None) -> ProbeOutcome | None:
    """The outcome named ``phrase`` in ``probe``'s family (or a runner result); ValueError if none is."""
    if phrase is None:
        return None
    for family in (type(EXPECTATIONS[probe].expected), Result):
        try:
            return family(phrase)
        except ValueError:
            continue
    raise ValueError(f"{phrase!r} is no outcome of probe {probe}")


def encode(key: HostKey, observations: Mapping[str, Observation]) -> bytes:
    entries = {probe: {"outcome": None if seen.outcome is None else str(seen.outcome), "detail": seen.detail,
                       "seal": seal(key, probe, None if seen.outcome is None else str(seen.outcome), seen.detail)}
               for probe, seen in observations.items()}
    return json.dumps({"format": FORMAT, "key": dataclasses.asdict(key), "entries": entries},
                      indent=1, sort_keys=True).encode()


@dataclasses.dataclass(frozen=True)
class CacheRead:
    """What a cache file held for a key: the entries that are sound, and what was wrong with the others."""

    path: Path
    observations: dict[str, Observation]
    tampered: dict[str, str]        # probe -> why its entry cannot be used
    stale: str = ""                 # why the whole file is for another key or format ("" if it is not)


def read(key: HostKey, path: Path | None = None) -> CacheRead | None:
    """The cache file for ``key``, checked entry by entry; None when there is none."""
    path = path or cache_path(key)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return CacheRead(path, {}, {}, f"unreadable: {exc}")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return CacheRead(path, {}, {}, f"not in the format {FORMAT!r}")
    if data.get("key") != dataclasses.asdict(key):
        return CacheRead(path, {}, {}, "written for another kernel, module, parameters or probe code")
    observations, tampered = {}, {}
    for probe, entry in sorted(data.get("entries", {}).items()):
        why = _unsound(key, probe, entry)
        if why:
            tampered[probe] = why
            continue
        observations[probe] = Observation(outcome_of(probe, entry["outcome"]), entry["detail"])
    return CacheRead(path, observations, tampered)


def _unsound(key: HostKey, probe: str, entry: object) -> str:
    """Why a cache entry cannot be used ("" when it can)."""
    if probe not in EXPECTATIONS:
        return "no such probe"
    if not isinstance(entry, dict) or set(entry) != {"outcome", "detail", "seal"}:
        return "not an entry pykvm writes"
    if entry["seal"] != seal(key, probe, entry["outcome"], entry["detail"]):
        return f"holds {entry['outcome']!r}, but its seal does not match: the entry was changed after it was measured"
    try:
        outcome_of(probe, entry["outcome"])
    except ValueError as exc:
        return str(exc)
    return ""


def store(key: HostKey, observations: Mapping[str, Observation]) -> Path:
    """Write the cache file for ``key`` (complete or not at all); remove other kernels' files, and the
    oldest of this kernel's other keys beyond :data:`KEYS_PER_KERNEL`."""
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, encode(key, observations))
    prune(path.parent, "*.json", [path, *_this_kernels_others(path, key)[:KEYS_PER_KERNEL - 1]])
    return path


def _this_kernels_others(path: Path, key: HostKey) -> list[Path]:
    """The cache's files, other than ``path``, written under ``key``'s kernel: the newest first."""
    others = []
    for other in path.parent.glob("*.json"):
        try:
            if other != path and json.loads(other.read_bytes())["key"]["kernel"] == key.kernel:
                others.append((other.stat().st_mtime_ns, other))
        except (OSError, ValueError, TypeError, KeyError):
            continue                    # unreadable or not ours: removed with the other kernels' files
    return [other for _, other in sorted(others, reverse=True)]


@contextlib.contextmanager
def locked(key: HostKey) -> Iterator[None]:
    """Hold the cache's lock: one process measures while the others wait for its file."""
    directory = cache_path(key).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / ".lock", "w")
    except OSError:             # a read-only cache: nothing to share, so nothing to lock
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


_measuring = threading.local()


def in_progress() -> bool:
    """Whether this thread is running probes now (:func:`pykvm.hosts.facts.detect` then gives the record)."""
    return getattr(_measuring, "active", False)


def run(kvm, scenarios: Iterable[probes.Scenario] = probes.SCENARIOS) -> dict[str, Observation]:
    """Run ``scenarios`` (default: every probe) now, marked as in progress.

    Code the probes call may ask for the host facts; measuring them there would
    run the probes inside themselves, so meanwhile the facts are the record's.
    """
    before = in_progress()
    _measuring.active = True
    try:
        return probes.run_probes(kvm, scenarios)
    finally:
        _measuring.active = before


def scenarios_for(wanted: Iterable[str]) -> list[probes.Scenario]:
    """The scenarios that measure the probes ``wanted``."""
    names = set(wanted)
    return [scenario for scenario in probes.SCENARIOS if names & {row.probe for row in scenario.rows}]


def fact_probes() -> list[str]:
    """The probes that define a host fact: what the tests and tools branch on."""
    return [row.probe for row in EXPECTATIONS.values() if row.fact is not None]


def load(kvm, key: HostKey | None = None, wanted: Iterable[str] | None = None) -> dict[str, Observation]:
    """The outcomes of the probes ``wanted`` (default: those defining a fact) on this host, cached per key.

    Missing entries are measured with ``kvm`` and added to the file; a file for
    another key is replaced. An entry that fails its seal raises
    :class:`HostFactsCacheError`: it is never used, and never silently replaced.
    """
    key = key or host_key()
    wanted = list(fact_probes() if wanted is None else wanted)
    with locked(key):
        cached = read(key)
        if cached is not None and cached.tampered:
            raise HostFactsCacheError(
                f"{cached.path}: the cached host facts were changed after pykvm measured them ("
                + "; ".join(f"{probe}: {why}" for probe, why in cached.tampered.items())
                + f"). They are not used: run `{REFRESH}` to measure this host again, or delete the file")
        observations = dict(cached.observations) if cached is not None and not cached.stale else {}
        missing = [probe for probe in wanted if probe not in observations]
        if missing:
            observations.update(run(kvm, scenarios_for(missing)))
            # A probe that failed is pykvm's bug, not the host's: it is measured again next time.
            sound = {probe: seen for probe, seen in observations.items() if seen.outcome != Result.PROBE_FAILED}
            with contextlib.suppress(OSError):       # a read-only cache: the facts are measured all the same
                store(key, sound)
    return {probe: observations[probe] for probe in wanted}


@dataclasses.dataclass(frozen=True)
class CacheCheck:
    """A fresh measurement held against the cache for the same key (what the doctor reports)."""

    path: Path
    written: str                                  # why the doctor wrote the file now ("" if it did not)
    contradictions: dict[str, tuple[str, str]]    # probe -> (cached outcome, outcome measured now)
    tampered: dict[str, str]                      # probe -> why its cached entry cannot be used
    stale: str                                    # why the file was for another key ("" if it was not)

    @property
    def sound(self) -> bool:
        return not self.contradictions and not self.tampered


def _phrase(outcome: ProbeOutcome | None) -> str:
    return "unsupported" if outcome is None else str(outcome)


def check(key: HostKey, fresh: Mapping[str, Observation], refresh: bool = False) -> CacheCheck:
    """Compare ``fresh`` (every probe, measured now) with the cache for ``key``; write it when asked or absent.

    ``refresh`` replaces the file with ``fresh``; without it, a file is written
    only where there was none (or one for another key), so a contradiction or a
    changed entry stays there, reported, until the caller refreshes.
    """
    with locked(key):
        cached = read(key)
        contradictions = {} if cached is None else {
            probe: (_phrase(seen.outcome), _phrase(fresh[probe].outcome))
            for probe, seen in cached.observations.items()
            if probe in fresh and fresh[probe].outcome not in (seen.outcome, Result.PROBE_FAILED)}
        written = ("--refresh" if refresh else "no earlier measurement for this key" if cached is None
                   else f"the file was {cached.stale}" if cached.stale else "")
        if written:
            store(key, {probe: seen for probe, seen in fresh.items() if seen.outcome != Result.PROBE_FAILED})
    return CacheCheck(cache_path(key), written, contradictions, {} if cached is None else cached.tampered,
                      "" if cached is None else cached.stale)
