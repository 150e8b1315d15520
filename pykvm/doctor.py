"""``python -m pykvm.doctor``: what this KVM host is, what it offers, and how it delivers events.

Why this exists: VT-x, AMD-V and paravirtual hosts such as kvm_pvm differ in
interrupt semantics, and a test author must be able to tell "KVM is broken"
from "this host legitimately differs". The doctor prints:

* the host's identity: vendor module, kernel and API version, CPU model,
  whether it is itself a guest, and ``/dev/kvm``'s permissions;
* the capabilities pykvm uses, each with the feature it gates;
* every probe of :mod:`pykvm.hosts.probes` run live, under the vendor
  module's parameters it prints, judged against the table in
  :mod:`pykvm.hosts.conformance`: probe | expected | observed | verdict |
  record, a line for each difference, and the probes whose outcome differs
  from pykvm's record for the vendor module (``differs from the record for
  kvm_intel: nmi_blocking_real``): the host facts follow this host's
  measurement, not the record;
* the cache of measured facts the tests and tools use
  (:mod:`pykvm.hosts.measurement`) held against this run: an entry this run
  contradicts, or one changed after it was measured, is named. The doctor
  writes the cache where there is none for this kernel, module and parameters;
  ``--refresh`` rewrites it from this run;
* which of KVM's trace events on one MSI's path this host emits
  (:mod:`pykvm.interrupt_path`).

``--json`` prints the same for machines; ``--markdown`` prints the table of
what every vendor module does (the one in ``docs/host-conformance.md``).
A differing host is information: the exit status is 0 unless pykvm itself
failed or its cache holds a changed entry (1), or ``/dev/kvm`` cannot be used (2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import stat

from . import interrupt_path
from .command import description, invoked_as, plain_text
from .core.constants import Cap
from .core.errors import KvmUnavailableError
from .core.system import DEFAULT_PATH, Kvm
from .exit_status import exit_with, run_command
from .hosts import conformance, measurement
from .hosts.probes.base import Observation
from .hosts.vendor import VendorModule, detect_vendor
from .runtime import trace

# The capabilities pykvm uses, with what each one gates.
CAPABILITIES: list[tuple[Cap, str]] = [
    (Cap.IRQCHIP, "in-kernel PIC/IOAPIC/LAPIC (create_vm(irqchip='kernel'))"),
    (Cap.SPLIT_IRQCHIP, "in-kernel LAPIC only (irqchip='split')"),
    (Cap.PIT2, "in-kernel 8254 timer (vm.create_pit())"),
    (Cap.USER_NMI, "KVM_NMI from userspace (vcpu.nmi())"),
    (Cap.IRQ_ROUTING, "GSI routing (vm.set_gsi_routing())"),
    (Cap.IRQ_INJECT_STATUS, "delivered/coalesced status of vm.irq_line()"),
    (Cap.SIGNAL_MSI, "vm.signal_msi()"),
    (Cap.IRQFD, "vm.irqfd()"),
    (Cap.IRQFD_RESAMPLE, "level-triggered irqfd with resample"),
    (Cap.IOEVENTFD, "vm.ioeventfd()"),
    (Cap.IMMEDIATE_EXIT, "vcpu.kick()"),
    (Cap.VCPU_EVENTS, "vcpu.events (NMI / interrupt shadow state)"),
    (Cap.SET_GUEST_DEBUG, "vcpu.set_single_step()"),
    (Cap.TSC_DEADLINE_TIMER, "LAPIC TSC-deadline timer mode"),
    (Cap.X2APIC_API, "x2APIC IDs in KVM_GET/SET_LAPIC"),
    (Cap.BINARY_STATS_FD, "vm.stats / vcpu.stats"),
    (Cap.GET_TSC_KHZ, "vcpu.tsc_khz (latency in the path comparison)"),
    (Cap.X86_SMM, "SMM (not used by pykvm's guests)"),
    (Cap.NESTED_STATE, "nested virtualization state (not used)"),
    (Cap.MAX_VCPUS, "most vCPUs per VM"),
    (Cap.NR_VCPUS, "recommended vCPUs per VM"),
]


@dataclasses.dataclass
class Identity:
    """Who this host is."""

    vendor: str
    kernel: str
    api_version: int | None
    cpu_model: str
    host_is_a_guest: bool
    dev_kvm: str
    parameters: str            # the vendor module's parameters the probes ran under


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def _dev_kvm(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    try:
        import grp
        import pwd
        owner = f"{pwd.getpwuid(info.st_uid).pw_name}:{grp.getgrgid(info.st_gid).gr_name}"
    except KeyError:
        owner = f"{info.st_uid}:{info.st_gid}"
    usable = "usable by you" if os.access(path, os.R_OK | os.W_OK) else "NOT readable+writable by you"
    return f"{path} {stat.filemode(info.st_mode)} {owner}, {usable}"


def identity(kvm: Kvm | None, key: measurement.HostKey | None = None) -> Identity:
    return Identity(vendor=detect_vendor().value, kernel=platform.release(),
                    api_version=kvm.api_version if kvm else None,
                    cpu_model=_cpuinfo_field("model name") or "unknown",
                    host_is_a_guest="hypervisor" in _cpuinfo_field("flags").split(),
                    dev_kvm=_dev_kvm(kvm.path if kvm else DEFAULT_PATH),
                    parameters=(key or measurement.host_key()).describe_parameters())


def capabilities(kvm: Kvm) -> list[dict]:
    return [{"capability": f"KVM_CAP_{cap.name}", "value": kvm.check_extension(cap), "gates": gates}
            for cap, gates in CAPABILITIES]


def examine(observations: dict[str, Observation]) -> list[conformance.Verdict]:
    """Judge every probe's observation against the table."""
    vendor = detect_vendor()
    return [conformance.judge(probe, observation.outcome, observation.detail, vendor)
            for probe, observation in observations.items()]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def report(ident: Identity, caps: list[dict], verdicts: list[conformance.Verdict],
           cache: measurement.CacheCheck) -> str:
    vendor = VendorModule(ident.vendor)
    lines = ["== host",
             f"  vendor module   {ident.vendor}",
             f"  parameters      {ident.parameters}",
             f"  kernel          {ident.kernel} (KVM API {ident.api_version})",
             f"  CPU             {ident.cpu_model}",
             f"  host is a guest {'yes (CPUID hypervisor bit)' if ident.host_is_a_guest else 'no'}",
             f"  /dev/kvm        {ident.dev_kvm}", "", "== capabilities"]
    lines += _table([[c["capability"], "yes" if c["value"] else "no",
                      str(c["value"]) if c["value"] > 1 else "", c["gates"]] for c in caps])
    lines += ["", f"== probes under {ident.parameters} (expected: architecture / KVM documentation; "
                  f"record: pykvm's table for {vendor.value})"]
    lines += _table([["probe", "expected", "observed", "verdict", "record"]] + [
        [v.probe, v.expected, str(v.observed), v.verdict, "as recorded" if v.matches_record
         else f"differs from the record ({v.recorded})"] for v in verdicts])
    differing = [v for v in verdicts if v.verdict != "conforms"]
    if differing:
        lines += ["", "== differences"]
        lines += [f"  {v.probe}: {v.explanation}\n    seen: {v.detail}" for v in differing]
    counts = {name: sum(v.verdict == name for v in verdicts)
              for name in ("conforms", "differs", "unsupported", "probe failed")}
    unrecorded = [v.probe for v in verdicts if not v.matches_record]
    lines += cache_lines(cache)
    lines += ["", "== summary", "  " + ", ".join(f"{n} {name}" for name, n in counts.items()),
              f"  differs from the record for {vendor.value}: {', '.join(unrecorded) if unrecorded else 'none'}"
              + (" (the host facts follow this run's measurement)" if unrecorded else ""),
              f"  cached facts: {'as measured now' if cache.sound else 'NOT as measured now (see == cache)'}"]
    return "\n".join(lines)


def cache_lines(cache: measurement.CacheCheck) -> list[str]:
    """The cache of measured facts against this run: what was written, contradicted or changed."""
    lines = ["", f"== cache of measured facts ({cache.path})"]
    if cache.stale:
        lines.append(f"  the file was {cache.stale}")
    lines += [f"  {probe}: the cached fact contradicts this run: cached '{cached}', measured now '{now}'"
              for probe, (cached, now) in cache.contradictions.items()]
    lines += [f"  {probe}: the cached entry cannot be used: {why}" for probe, why in cache.tampered.items()]
    if cache.written:
        lines.append(f"  written from this run ({cache.written})")
    elif not cache.sound:
        lines.append(f"  left as it is: run `{measurement.REFRESH}` to replace it with this run")
    else:
        lines.append("  every cached fact is as measured now")
    return lines


DOCS_HEADER = """# What each KVM host does

Generated by `python -m pykvm.doctor --markdown` from `pykvm/hosts/conformance.py`, the
table the doctor judges a live run against; its rows are written beside the scenarios
that measure them, one module per probe family in `pykvm/hosts/probes/`. Every column
was measured by the doctor: kvm_pvm on this project's CI host, kvm_amd on the upstream
module under QEMU's emulated AMD-V (`python -m pykvm.hosts tcg-amd -- python -m
pykvm.doctor`), and kvm_intel on the upstream module under Bochs 3.0's emulated VMX,
loaded with `enable_apicv=0` (`python -m pykvm.hosts bochs-intel -- python -m
pykvm.doctor`). The real- and protected-mode rows of the probes run per CPU mode
(`irq_window`, `interrupt_not_ready`, `nmi_blocking`, `nmi_window`, `step_sti_shadow`)
came later, measured on Debian Linux 6.12.118 on both emulated hosts (on kvm_amd each
gave its long-mode row's outcome).

This table is the record of what was measured where. The facts the tests and tools
branch on are measured on the running host by the same probes, once per kernel,
vendor module and module parameters, and cached (`pykvm/hosts/measurement.py`); the
doctor names each probe whose outcome differs from the record for its vendor module.
Run `python -m pykvm.doctor` to see your own host (`--refresh` re-measures the cache).

Notes on the kvm_pvm column:

- `real_mode_ud2`: `ud2` in real mode ends in `KVM_EXIT_INTERNAL_ERROR` every time
  (KVM's emulator, which runs real mode on kvm_pvm, has no decoding for UD2).
- `sti_shadow` / `mov_ss_shadow`: PVM's specification says native long mode has no
  interrupt shadow. Without single-step the question cannot be observed there,
  because kvm_pvm injects pending vectors only at VM entries (`lapic_after_sti`);
  under single-step every instruction is an entry, and the shadow is honoured and
  reported by `KVM_GET_VCPU_EVENTS`.
- `int3` / `int n` fail in 32-bit protected mode as well as in long mode, a held NMI
  waits for the next VM entry (`nmi_window`), the LAPIC keeps nothing in its ISR
  (`lapic_isr`), and HLT under single-step does not halt on kvm_pvm but does on kvm_amd.

Notes on the kvm_intel column (Bochs 3.0, one CPU, `enable_apicv=0`):

- `enable_apicv=0`: Bochs 3.0 fails the VM entry (VM-instruction error 7) unless the
  posted-interrupt descriptor is page-aligned; the Intel SDM asks for 64-byte alignment,
  which kvm_intel's descriptor has. With APICv on, the in-kernel-LAPIC probes cannot
  enter the guest. Real Intel hosts usually run with APICv on, which this column does
  not cover.
- `interrupt_not_ready`: `KVM_EXIT_FAIL_ENTRY`, reason 0x80000021 (invalid guest
  state): the SDM's VM-entry check that RFLAGS.IF is 1 when an external interrupt is
  injected, named as such in Bochs's log. pykvm explains the exit
  (`pykvm.hosts.limits`), and `pykvm.injection.Injector` refuses such an injection
  (the core's `vcpu.interrupt()`, the bare ioctl, makes it).
- `step_sti_shadow`: the step over `sti` stops at the shadowed `nop` with
  `KVM_X86_SHADOW_INT_STI` set. That is Bochs 3.0's answer; Bochs 2.7 reported no
  shadow there because its `VMexit_Event` cleared the STI blocking before the VM exit
  saved the interruptibility state (A/B with the same kernel, image and probe:
  shadow=0x0 under 2.7, 0x2 under 3.0), which the SDM rules out (Vol. 3C 27.1 and 27.3.4).
- `sti_shadow` differs because of KVM, not Bochs: while `KVM_GUESTDBG_SINGLESTEP` is
  on, kvm_intel clears the STI / MOV SS interruptibility bits before every VM entry
  (`vmx_vcpu_run`), since the entry would otherwise demand a pending single-step #DB.
  After the step over `sti` KVM reports the shadow (shadow=0x2, ready=0), and the next
  entry has none: a requested interrupt-window exit, or a pending LAPIC vector, comes
  before the shadowed `nop`. Without single-step the shadow holds (`irq_window`,
  `lapic_after_sti`).
- Without unrestricted guest (`enable_apicv=0 ept=0 unrestricted_guest=0`, a configuration
  the column does not record), kvm_intel runs real mode in vm86 and delivers events there
  through its instruction emulator. The doctor then reports three real-mode rows as
  different from the record: `interrupt_not_ready_real` (a forced `KVM_INTERRUPT` with
  IF=0 is delivered, where the VM entry fails with unrestricted guest),
  `nmi_blocking_real` (the events report NMIs unmasked inside the NMI handler, and a
  second NMI nests there) and `nmi_window_real` (so it is not held for the IRET).
  Protected and long mode run in VMX as recorded.

"""


def markdown_table() -> str:
    """Probe x host: what pykvm recorded for kvm_pvm, kvm_amd and kvm_intel."""
    hosts = [VendorModule.PVM, VendorModule.AMD, VendorModule.INTEL]
    lines = ["| probe | expected (architecture / KVM docs) | kvm_pvm | kvm_amd (QEMU TCG) | "
             "kvm_intel (Bochs 3.0) |", "|---|---|---|---|---|"]
    for row in conformance.EXPECTATIONS.values():
        cells = []
        for vendor in hosts:
            known = row.known(vendor)
            mark = "" if known.outcome == row.expected else " **(differs)**"
            cells.append(f"{known.outcome}{mark}{'' if known.verified else ' (not measured)'}")
        lines.append(f"| `{row.probe}`: {row.title} | {row.expected} | {' | '.join(cells)} |")
    lines += ["", "Sources:", ""]
    lines += [f"- `{row.probe}`: {row.source}" for row in conformance.EXPECTATIONS.values()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # The docstring's last paragraph (its options and exit statuses) closes the help, as plain text.
    parser = argparse.ArgumentParser(prog=invoked_as("pykvm.doctor"), description=description(__doc__),
                                     epilog=plain_text((__doc__ or "").strip().split("\n\n")[-1]))
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--markdown", action="store_true",
                        help="print pykvm's probe x host table (docs/host-conformance.md) and exit")
    parser.add_argument("--refresh", action="store_true",
                        help="rewrite the cache of measured host facts (which the tests and tools use) "
                             "from this run")
    args = parser.parse_args(argv)
    if args.markdown:
        print(DOCS_HEADER + markdown_table())
        return 0
    return run_command("pykvm doctor", lambda: run_doctor(args.json, args.refresh))


def traced_path() -> dict:
    """Which of KVM's trace events on one MSI's path this host emits (pykvm.interrupt_path)."""
    try:
        path = interrupt_path.trace_interrupt()
    except trace.TracingUnavailable as exc:
        return {"recorded": False, "why": str(exc)}
    return {"recorded": True, "vector_logged": [r.vector for r in path.records] == [path.vector],
            "emitted": [name for name in interrupt_path.PATH_EVENTS if name in path.fired],
            "not_emitted": list(path.not_emitted)}


def trace_lines(traced: dict) -> list[str]:
    lines = ["", "== trace events on one MSI's path (python -m pykvm.demo prints the timeline)"]
    if not traced["recorded"]:
        return lines + [f"  not recorded: {traced['why']}"]
    return lines + [f"  emitted      {', '.join(traced['emitted']) or 'none'}",
                    f"  not emitted  {', '.join(traced['not_emitted']) or 'none'}",
                    f"  the guest logged the vector: {'yes' if traced['vector_logged'] else 'NO'}"]


def run_doctor(as_json: bool, refresh: bool = False) -> int:
    """Examine this host and print the report (or JSON); 1 if a probe failed or the cache holds a changed entry."""
    try:
        key = measurement.host_key()
        with Kvm() as kvm:
            ident, caps, observations = identity(kvm, key), capabilities(kvm), measurement.run(kvm)
        verdicts = examine(observations)
        cache = measurement.check(key, observations, refresh)
        traced = traced_path()
    except KvmUnavailableError as exc:
        if as_json:
            print(json.dumps({"host": dataclasses.asdict(identity(None)), "error": str(exc)}, indent=1))
        raise
    if as_json:
        print(json.dumps({"host": dataclasses.asdict(ident), "capabilities": caps,
                          "probes": [dataclasses.asdict(v) for v in verdicts],
                          "cache": dataclasses.asdict(cache), "trace": traced}, indent=1, default=str))
    else:
        print(report(ident, caps, verdicts, cache))
        print("\n".join(trace_lines(traced)))
    return 1 if any(v.verdict == "probe failed" for v in verdicts) or cache.tampered else 0


if __name__ == "__main__":
    exit_with(main())
