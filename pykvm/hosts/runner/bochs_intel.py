"""The bochs-intel host: upstream ``kvm_intel`` in a stock Debian kernel under Bochs's emulated VMX.

Why this exists: kvm_pvm and kvm_amd are measured on this machine, but VT-x is
the host most KVM users run, and its interrupt semantics (the interrupt
window, VM-entry checks, the STI shadow in the interruptibility state) are
what pykvm's table calls the architecture. Bochs emulates VMX with EPT,
unrestricted guest and virtual NMIs, so a stock Debian kernel booted in it
loads the upstream ``kvm_intel`` module, and the caller's command runs there.

Pieces, and where they come from (all cached in ``$XDG_CACHE_HOME/pykvm/bochs-intel``):

* Bochs 3.0, built once from Debian's source package (:mod:`.bochs`).
* ``genisoimage``, isolinux, a static busybox, cpio, ``mkfs.ext4``, a C++
  compiler and make: Debian packages, installed with apt-get when missing and
  running as root (:mod:`.tools`), as tcg-amd does.
* The newest ``linux-image-<version>-amd64`` in apt's lists (:mod:`.kernel`,
  shared with tcg-amd), and from it ``<release>/boot-<key>.iso``: isolinux,
  the kernel and an uncompressed initramfs holding busybox, the modules (their
  signatures stripped: verifying them took 10 of 18 s of module loading under
  Bochs) and ``/init``.
* ``disk-<key>.img``: the ext4 image the command runs on (:mod:`.disk`).

Per run only the 504 KiB command disk is written. ``/init`` loads the ATA,
ext4 and overlay modules, finds the command disk, loads kvm_intel with the
parameters it holds, mounts the image read-only under an overlay in guest RAM
(every write is discarded, as on tcg-amd) and runs the command chrooted
there. Bochs writes COM1 into a FIFO the runner reads (:mod:`.emulator`).

Limits: one CPU (:func:`.bochs.bochsrc`), kvm_intel loaded with
``enable_apicv=0`` by default (:data:`DEFAULT_KVM_INTEL_PARAMETERS`), and
emulation speed: booting to the command takes about 20-25 s, and the command
runs some 100 times slower than on hardware.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

from . import bochs, cache, disk, emulator, initramfs, kernel
from .console import Markers
from .tools import ensure_tools, say

NAME = "bochs-intel"
ISOLINUX_BIN = "/usr/lib/ISOLINUX/isolinux.bin"
LDLINUX = "/usr/lib/syslinux/modules/bios/ldlinux.c32"
# Debian package of each tool (or file) the runner needs.
TOOL_PACKAGES = {"genisoimage": "genisoimage", ISOLINUX_BIN: "isolinux", LDLINUX: "syslinux-common",
                 "busybox": "busybox-static", "cpio": "cpio", "mkfs.ext4": "e2fsprogs", "ldd": "libc-bin",
                 "g++": "g++", "make": "make", "tar": "tar", "xz": "xz-utils"}
# Modules the guest loads (with their dependencies), unless built in: the ATA disks, ext4, the
# overlay, KVM. kvm_intel comes last, with the run's parameters.
MODULE_ROOTS = ("ata_piix", "sd_mod", "crc32c_generic", "ext4", "overlay", "kvm_intel")
# acpi=off: ACPI's initialisation took 5.4 of the 12.5 emulated seconds to /init. Without
# ACPI the guest cannot power Bochs off; the runner stops Bochs once the guest has reported.
KERNEL_COMMAND_LINE = "console=ttyS0,115200 quiet panic=-1 rdinit=/init mitigations=off acpi=off"
# kvm_intel's APICv is off by default: Bochs 3.0 fails the VM entry (VM-instruction error 7,
# "Posted Interrupt Descriptor phy addr malformed") unless the posted-interrupt descriptor is
# page-aligned (its cpu/vmx.cc checks IsValidPageAlignedPhyAddr), while the Intel SDM (Vol. 3C
# 26.2.1.1) asks only that bits 5:0 of its address be 0, and kvm_intel's descriptor is 64-byte
# aligned inside struct vcpu_vmx. With APICv on, every in-kernel-LAPIC probe fails to enter.
# Real Intel hosts usually run with APICv on: `--kvm-intel-parameters ''` gives the module's
# defaults on a Bochs that accepts them.
DEFAULT_KVM_INTEL_PARAMETERS = "enable_apicv=0"
# pykvm's source tree (the directory holding the package): on the image when it is not the working directory.
PYKVM_SOURCE = Path(__file__).resolve().parents[3]
NO_KVM = "kvm_intel loaded but /dev/kvm is missing: does Bochs's CPU model offer VMX?"
ISO_LAYOUT = "bochs-intel iso: isolinux, uncompressed initramfs, stripped modules, v1"

# /init's module loading: everything but kvm_intel, then the command disk (the nonce, kvm_intel's
# parameters, the script), then kvm_intel with those parameters.
LOAD_MODULES = f"""for module in $(cat /lib/modules/load-order); do
    [ "$module" = kvm_intel ] || insmod "/lib/modules/$module.ko" \\
        || fail "insmod $module failed (see the kernel messages above)"
done
command_disk=""
root_disk=""
for try in $(seq 300); do
    for disk in /sys/block/sd*; do
        [ -e "$disk" ] || continue
        name=/dev/${{disk##*/}}
        if [ "$(head -c {len(disk.COMMAND_DISK_MAGIC)} "$name" 2>/dev/null)" = "{disk.COMMAND_DISK_MAGIC}" ]; then
            command_disk=$name
        elif [ -b "$name" ]; then
            root_disk=$name
        fi
    done
    [ -n "$command_disk" ] && [ -n "$root_disk" ] && break
    sleep 0.1
done
[ -n "$command_disk" ] || fail "no command disk among the disks: $(ls /sys/block)"
[ -n "$root_disk" ] || fail "no disk image besides the command disk: $(ls /sys/block)"
tr -d '\\000' < "$command_disk" > /command.disk
nonce=$(sed -n 2p /command.disk)
sed 1,3d /command.disk > /command.sh
insmod /lib/modules/kvm_intel.ko $(sed -n 3p /command.disk) \\
    || fail "insmod kvm_intel $(sed -n 3p /command.disk) failed (see the kernel messages above)"
"""
MOUNT_DISK_IMAGE = 'mount -t ext4 -o ro,noload "$root_disk" /lower || fail "cannot mount $root_disk (ext4)"'


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything needed to boot: Bochs, the boot ISO of a kernel release, and the disk image."""

    bochs: bochs.Build
    release: str
    iso: Path
    disk: Path


def init_script() -> str:
    """This host's ``/init``, the same on every run (the nonce comes from the command disk)."""
    return initramfs.init_script(Markers("$nonce"), MOUNT_DISK_IMAGE, NO_KVM, LOAD_MODULES)


def iso_key(busybox: bytes) -> str:
    """Key of the boot ISO: its layout, modules, kernel command line, ``/init`` and busybox."""
    digest = hashlib.sha256(repr((ISO_LAYOUT, MODULE_ROOTS, KERNEL_COMMAND_LINE, init_script())).encode())
    digest.update(busybox)
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/pykvm/bochs-intel``, else ``~/.cache/pykvm/bochs-intel``."""
    return cache.cache_root(NAME)


def build_iso(package: kernel.KernelPackage, tools: dict[str, Path], iso: Path) -> None:
    """Download and unpack ``package``; build the boot ISO of its kernel and modules at ``iso``."""
    with tempfile.TemporaryDirectory(prefix="pykvm-bochs-intel-") as work_name:
        work = Path(work_name)
        unpacked = kernel.download_kernel(package, work, NAME, iso.parent.parent)
        order, images = kernel.collect_modules(unpacked.modules_dir, MODULE_ROOTS)
        stripped = {name: initramfs.strip_module_signature(image) for name, image in images.items()}
        initrd = initramfs.base_archive(work / "initramfs", tools["busybox"], order, stripped, tools["cpio"],
                                        init=init_script(), compress=False)
        iso.parent.mkdir(parents=True, exist_ok=True)
        temporary = iso.with_name(f".{iso.name}.{os.getpid()}")
        bochs.build_iso(work / "iso", unpacked.vmlinuz.read_bytes(), initrd, KERNEL_COMMAND_LINE,
                        tools[ISOLINUX_BIN], tools[LDLINUX], tools["genisoimage"], temporary)
        os.replace(temporary, iso)
    cache.prune(iso.parent, "boot-*.iso", [iso])


def prepare(release: str | None = None) -> Prepared:
    """Install the tools; fetch and build Bochs, the boot ISO and the disk image, or reuse them."""
    tools = ensure_tools(TOOL_PACKAGES)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    build = bochs.build(root, bochs.fetch_source(root))
    iso_name = f"boot-{iso_key(tools['busybox'].read_bytes())}.iso"
    release, package = kernel.resolve_kernel(root, lambda d: (d / iso_name).exists(), release)
    iso = root / release / iso_name
    if package is not None:
        build_iso(package, tools, iso)
    found = disk.manifest(Path.cwd(), tools["busybox"], [PYKVM_SOURCE], root / "ldd.json")
    image = root / f"disk-{disk.image_key(found)}.img"
    reused = image.exists()
    if not reused:
        say(f"building the disk image ({len(found.entries)} entries: the working directory, the "
            f"virtualenv, Python {found.python_version.split()[-1]}, binutils)")
        began = time.monotonic()
        disk.build_image(found, image, tools["mkfs.ext4"])
        say(f"disk image built in {time.monotonic() - began:.0f} s")
        cache.prune(root, "disk-*.img", [image])
    say(f"kernel {release}, Bochs {build.bochs.parent.name}, cache {root} (ISO "
        f"{'built now' if package else 'reused'}, disk image of {image.stat().st_size >> 20} MiB "
        f"{'reused' if reused else 'built now'})")
    return Prepared(build, release, iso, image)


def run(argv: list[str], release: str | None, memory_mib: int, timeout: float,
        kvm_intel_parameters: str = DEFAULT_KVM_INTEL_PARAMETERS) -> int:
    """Prepare, then run ``argv`` on kvm_intel in the caller's directory and environment."""
    prepared = prepare(release)
    markers = Markers.fresh()
    env = initramfs.guest_environment(os.environ, sys.stdout.isatty())
    script = initramfs.command_script(argv, os.getcwd(), env)
    with tempfile.TemporaryDirectory(prefix="pykvm-bochs-intel-run-") as directory:
        here = Path(directory)
        (here / "command.img").write_bytes(disk.command_disk(markers, script, kvm_intel_parameters))
        # Bochs locks "<image>.lock" beside each disk: a per-run link keeps the cached image usable
        # by concurrent runs and free of stale locks when Bochs is killed.
        (here / "disk.img").symlink_to(prepared.disk)
        os.mkfifo(here / "com1")
        (here / "bochsrc").write_text(bochs.bochsrc(prepared.bochs, prepared.iso, here / "disk.img",
                                                    here / "command.img", here / "com1", here / "bochs.log",
                                                    memory_mib))
        # Read-write: the FIFO never reports EOF, and Bochs's open never blocks.
        console = os.open(here / "com1", os.O_RDWR | os.O_NONBLOCK)
        try:
            return emulator.boot([str(prepared.bochs.bochs), "-q", "-f", str(here / "bochsrc")], markers,
                                 timeout, sys.stdout.buffer, NAME, console_fd=console, grace=0.2,
                                 emulator_log=lambda: _log_tail(here / "bochs.log"),
                                 slow_hint="Raise --timeout if the command is just slow under Bochs "
                                           "(it emulates every instruction)")
        finally:
            os.close(console)


def _log_tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "Bochs's log ends:\n" + "\n".join(lines[-15:]) if lines else ""
