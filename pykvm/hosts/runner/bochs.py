"""Bochs: its source from Debian's archive, its build, its configuration and the ISO it boots.

Why this exists: the bochs-intel host needs an emulator with VMX (EPT,
unrestricted guest, virtual NMIs) so that a stock kernel can load kvm_intel.
Bochs emulates it; Debian ships its source, and a build with a fixed configure
line takes about two minutes. Debian's own ``bochs`` binary package (2.7 in
bookworm) is not used: Bochs 2.7's ``VMexit_Event`` cleared the STI blocking
before the VM exit saved the guest's interruptibility state, so kvm_intel
reported no STI shadow after a single-step exit (docs/howto/other-hosts.md); Bochs
3.0 (trixie's source package) saves it as the SDM says.

The source is fetched with ``apt-get source --download-only --tar-only`` under
a private apt configuration in the cache (its own ``sources.list`` with one
``deb-src`` line, lists and archive cache), so the system's apt configuration
is not touched. ``--tar-only`` because the mirror serves trixie's orig tarball
but not its ``.dsc``; apt checks the tarball against the signed Sources index.
The orig tarball builds as it is (Debian's patches are packaging fixes), and
it keeps SeaBIOS and the Cirrus SeaVGABIOS, which this runner boots with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .console import tail_lines
from .errors import HostRunnerError, MirrorUnreachable
from .tools import apt, offline, run, say

# Where Bochs comes from: the source package of Debian's current stable release (3.0+dfsg
# in trixie). Any bochs_*.orig.tar.* it serves is accepted.
SOURCE_LINE = "deb-src http://deb.debian.org/debian trixie main"
CONFIGURE = (
    "--with-nogui", "--without-x11", "--without-x", "--enable-x86-64", "--enable-cpu-level=6",
    "--enable-vmx=2", "--enable-svm", "--enable-avx", "--enable-evex",
    "--enable-all-optimizations", "--enable-repeat-speedups", "--enable-pci", "--enable-cdrom",
    "--disable-debugger", "--disable-x86-debugger", "--disable-instrumentation",
    "--disable-plugins",
)
CXXFLAGS = "-O3 -fomit-frame-pointer"
CPU_MODEL = "corei7_skylake_x"      # VMX with EPT, unrestricted guest, virtual NMIs
# Emulated instructions per emulated second with `clock: sync=none` (25 M, 100 M and 400 M
# made no measurable difference to a run's wall time).
IPS = 100_000_000
BIOS = "bios/bios.bin-1.13.0"                   # SeaBIOS, kept in Debian's +dfsg tarball
VGABIOS = "bios/vgabios-cirrus.bin-1.13.0"      # SeaVGABIOS for the Cirrus card


@dataclasses.dataclass(frozen=True)
class Build:
    """A built Bochs: the emulator and the BIOS images it boots with."""

    bochs: Path
    bios: Path
    vgabios: Path


# ---------------------------------------------------------------- pure decisions

def private_apt_options(root: Path) -> list[str]:
    """apt options that use only ``root``'s sources.list, lists and archive cache."""
    return ["-o", f"Dir::Etc::SourceList={root / 'sources.list'}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "APT::Sandbox::User=root"]


def tarball_version(name: str) -> str:
    """``3.0`` of ``bochs_3.0+dfsg.orig.tar.xz``; a hash of the name when it shows no version."""
    match = re.search(r"bochs[_-](\d+(?:\.\d+)+)", name)
    return match.group(1) if match else hashlib.sha256(name.encode()).hexdigest()[:8]


def build_key() -> str:
    """Key of the build options: a build with other options is another build."""
    return hashlib.sha256(repr((CONFIGURE, CXXFLAGS)).encode()).hexdigest()[:8]


def bochsrc(build: Build, iso: Path, disk: Path, command_disk: Path, serial: Path, log: Path,
            memory_mib: int) -> str:
    """The Bochs configuration: one CPU with VMX, SeaBIOS, i440fx PCI, the ext4 image and the
    command disk on ata0, the boot ISO on ata1, COM1 written into ``serial``, no display.

    One CPU: a Bochs built with ``--enable-smp`` and ``count=2`` showed the guest one CPU
    without ACPI, lost its disks with ACPI, and ran everything 4-5 times slower (docs/howto/other-hosts.md).
    """
    return f"""\
display_library: nogui
megs: {memory_mib}
cpu: model={CPU_MODEL}, count=1, ips={IPS}, reset_on_triple_fault=0
clock: sync=none, time0=utc
romimage: file={build.bios}
vgaromimage: file={build.vgabios}
vga: extension=cirrus
pci: enabled=1, chipset=i440fx
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=disk, path={disk}, mode=flat
ata0-slave: type=disk, path={command_disk}, mode=flat
ata1: enabled=1, ioaddr1=0x170, ioaddr2=0x370, irq=15
ata1-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev={serial}
log: {log}
panic: action=fatal
error: action=report
info: action=ignore
debug: action=ignore
"""


def isolinux_cfg(command_line: str) -> str:
    """isolinux's configuration: boot ``/vmlinuz`` with ``/initrd.cpio`` at once."""
    return ("DEFAULT linux\nPROMPT 0\nTIMEOUT 0\n"
            f"LABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.cpio\n  APPEND {command_line}\n")


# ---------------------------------------------------------------- side effects

def fetch_source(cache: Path) -> Path:
    """Bochs's orig tarball from Debian's archive, downloaded once into ``cache/src``."""
    directory = cache / "src"
    found = sorted(directory.glob("bochs_*.orig.tar.*"))
    if found:
        return found[-1]
    directory.mkdir(parents=True, exist_ok=True)
    root = cache / "apt-src"
    for path in (root / "lists" / "partial", root / "cache" / "archives" / "partial"):
        path.mkdir(parents=True, exist_ok=True)
    (root / "sources.list").write_text(SOURCE_LINE + "\n")
    options = private_apt_options(root)
    say(f"fetching the Bochs source: apt-get update and source --tar-only bochs ({SOURCE_LINE}, "
        f"private configuration in {root})")
    for step, cwd in ((["update"], None), (["source", "--download-only", "--tar-only", "bochs"], directory)):
        result = apt("apt-get", *options, *step, cwd=cwd)
        if result.returncode != 0:
            message = (f"`apt-get {' '.join(step)}` for the Bochs source failed"
                       f"{': the Debian mirror is unreachable' if offline(result.stdout) else ''}; run "
                       f"`python -m pykvm.hosts bochs-intel --prepare` where it is reachable\n"
                       f"{tail_lines(result.stdout, 10)}")
            raise MirrorUnreachable(message) if offline(result.stdout) else HostRunnerError(message)
    found = sorted(directory.glob("bochs_*.orig.tar.*"))
    if not found:
        raise HostRunnerError(f"apt-get source fetched no bochs_*.orig.tar.* into {directory}")
    return found[-1]


def build(cache: Path, tarball: Path) -> Build:
    """Bochs built from ``tarball`` into ``cache/bochs-<version>-<options key>``, once."""
    tree = cache / f"bochs-{tarball_version(tarball.name)}-{build_key()}"
    bochs = tree / "bochs"
    if not bochs.exists():
        with tempfile.TemporaryDirectory(prefix="pykvm-bochs-build-", dir=cache) as work_name:
            work = Path(work_name) / "bochs"
            work.mkdir()
            _step(["tar", "xf", str(tarball), "-C", str(work), "--strip-components=1"], None, "unpack")
            jobs = max(1, min(os.cpu_count() or 1, 4))
            say(f"building Bochs {tarball_version(tarball.name)} (configure; make -j{jobs}: about 2 "
                f"minutes on 2 cores, once)")
            began = time.monotonic()
            _step(["./configure", *CONFIGURE, f"CXXFLAGS={CXXFLAGS}"], work, "configure")
            _step(["make", f"-j{jobs}"], work, "make")
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(work, tree)
            say(f"Bochs built in {time.monotonic() - began:.0f} s")
    found = Build(bochs, tree / BIOS, tree / VGABIOS)
    missing = [str(path) for path in (found.bochs, found.bios, found.vgabios) if not path.exists()]
    if missing:
        raise HostRunnerError(f"missing after the Bochs build: {', '.join(missing)}")
    for old in cache.glob("bochs-*"):
        if old.is_dir() and old != tree:
            shutil.rmtree(old, ignore_errors=True)
    return found


def _step(argv: list[str], cwd: Path | None, what: str) -> None:
    result = run(argv, cwd)
    if result.returncode != 0:
        raise HostRunnerError(f"Bochs {what} failed ({result.returncode}):\n{tail_lines(result.stdout, 15)}")


def build_iso(tree: Path, vmlinuz: bytes, initrd: bytes, command_line: str, isolinux_bin: Path,
              ldlinux: Path, genisoimage: Path, output: Path) -> None:
    """The boot ISO (isolinux, the kernel, the initramfs), built in the empty directory ``tree``."""
    (tree / "isolinux").mkdir(parents=True)
    shutil.copy(isolinux_bin, tree / "isolinux" / "isolinux.bin")
    shutil.copy(ldlinux, tree / "isolinux" / "ldlinux.c32")
    (tree / "isolinux" / "isolinux.cfg").write_text(isolinux_cfg(command_line))
    (tree / "vmlinuz").write_bytes(vmlinuz)
    (tree / "initrd.cpio").write_bytes(initrd)
    result = run([str(genisoimage), "-quiet", "-o", str(output), "-b", "isolinux/isolinux.bin",
                  "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4",
                  "-boot-info-table", "-R", "-J", str(tree)])
    if result.returncode != 0:
        raise HostRunnerError(f"genisoimage failed:\n{tail_lines(result.stdout, 10)}")
