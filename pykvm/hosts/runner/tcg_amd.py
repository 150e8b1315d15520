"""The tcg-amd host: upstream ``kvm_amd`` in a stock Debian kernel under QEMU's emulated AMD-V.

Why this exists: a machine may offer only one KVM, such as kvm_pvm, whose interrupt
semantics differ from the architecture (:mod:`pykvm.hosts.conformance`). The
upstream ``kvm_amd`` module is the standard host to compare with, and QEMU's
software emulation (TCG) of AMD-V lets it run here: a stock Debian kernel
boots under ``qemu-system-x86_64 -accel tcg -cpu max``, loads ``kvm_amd``,
mounts this machine's ``/`` over 9p and runs the command chrooted into it, in
the caller's working directory with the caller's Python and virtualenv.
The command's exit status comes back as the runner's.

Pieces, and where they come from:

* ``qemu-system-x86_64``, a static ``busybox`` and ``cpio``: Debian packages
  ``qemu-system-x86``, ``busybox-static``, ``cpio``, installed with apt-get
  when missing and running as root (:mod:`.tools`).
* The newest ``linux-image-<version>-amd64`` in apt's lists, fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x`` (:mod:`.kernel`). Its
  ``vmlinuz`` and an initramfs (busybox plus the modules ``kvm_amd``, 9p and
  overlayfs need, decompressed: :mod:`.initramfs`) are cached in
  ``$XDG_CACHE_HOME/pykvm/tcg-amd/<version>/``.
* Per run, a second small archive holding ``/init`` and the command script is
  appended to the cached initramfs, and QEMU runs it (:mod:`.qemu`,
  :mod:`.emulator`).

Inside the guest, the host's root is the read-only lower layer of an overlay
whose upper layer is guest RAM: every path is writable there and every write
is discarded at power-off. The command's stdout and stderr share the serial
console, which is streamed to the caller's stdout (:mod:`.console`); the
runner's own messages go to stderr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

from . import cache, emulator, initramfs, kernel, qemu
from .console import Markers
from .tools import ensure_tools, say

NAME = "tcg-amd"
# Debian package of each tool the runner needs.
TOOL_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
                 "cpio": "cpio"}
# Modules the guest loads (with their dependencies), unless built in.
MODULE_ROOTS = ("kvm_amd", "virtio_pci", "9pnet_virtio", "9p", "overlay")
NO_KVM = "kvm_amd loaded but /dev/kvm is missing: does QEMU's -cpu offer SVM?"
# kvm_amd's module parameters for a run (``--kvm-amd-parameters``, e.g. npt=0 for shadow paging):
# empty, or space-separated words of a shell-safe alphabet.
KVM_AMD_PARAMETERS = re.compile(r"([\w.,=-]+( [\w.,=-]+)*)?", re.ASCII)


@dataclasses.dataclass(frozen=True)
class Tools:
    """The located executables."""

    qemu: Path
    busybox: Path
    cpio: Path


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything needed to boot: tools, the cached kernel and base initramfs."""

    tools: Tools
    release: str
    cache_dir: Path
    vmlinuz: Path
    initramfs: Path
    reused: bool


def check_kvm_amd_parameters(parameters: str) -> str:
    """``parameters`` when they are plain ``name=value`` words (they go unquoted on /init's insmod line)."""
    if not KVM_AMD_PARAMETERS.fullmatch(parameters):
        raise ValueError(f"kvm_amd parameters {parameters!r}: give space-separated name=value words of letters, "
                         "digits and _ . , - (e.g. 'npt=0')")
    return parameters


def load_modules(kvm_amd_parameters: str) -> str:
    """/init's module loading: every module of the base archive, kvm_amd with ``kvm_amd_parameters``."""
    if not check_kvm_amd_parameters(kvm_amd_parameters):
        return initramfs.LOAD_MODULES
    return f"""for module in $(cat /lib/modules/load-order); do
    parameters=""
    [ "$module" = kvm_amd ] && parameters="{kvm_amd_parameters}"
    insmod "/lib/modules/$module.ko" $parameters \\
        || fail "insmod $module $parameters failed (see the kernel messages above)"
done"""


def init_script(markers: Markers, kvm_amd_parameters: str = "") -> str:
    """This host's ``/init``: load kvm_amd (with ``kvm_amd_parameters``), overlay the root QEMU shares over 9p,
    run the command."""
    return initramfs.init_script(markers, qemu.MOUNT_HOST_ROOT, NO_KVM, load_modules(kvm_amd_parameters))


# ---------------------------------------------------------------- the cache

def cache_root() -> Path:
    """``$XDG_CACHE_HOME/pykvm/tcg-amd``, else ``~/.cache/pykvm/tcg-amd``."""
    return cache.cache_root(NAME)


def _base_key(busybox: Path) -> str:
    digest = hashlib.sha256(initramfs.BASE_LAYOUT.encode() + repr(MODULE_ROOTS).encode())
    digest.update(busybox.read_bytes())
    return digest.hexdigest()[:12]


def _cached(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / "vmlinuz", cache_dir / f"initramfs-{key}.cpio.gz"


def build_kernel_cache(package: kernel.KernelPackage, tools: Tools, cache_dir: Path, key: str) -> None:
    """Download and unpack ``package``; cache its vmlinuz and the base initramfs in ``cache_dir``."""
    with tempfile.TemporaryDirectory(prefix="pykvm-tcg-amd-") as work_name:
        work = Path(work_name)
        unpacked = kernel.download_kernel(package, work, NAME, cache_dir.parent)
        order, images = kernel.collect_modules(unpacked.modules_dir, MODULE_ROOTS)
        archive = initramfs.base_archive(work / "initramfs", tools.busybox, order, images, tools.cpio)
        cache_dir.mkdir(parents=True, exist_ok=True)
        vmlinuz_cache, initramfs_cache = _cached(cache_dir, key)
        cache.write_atomically(initramfs_cache, archive)
        cache.write_atomically(vmlinuz_cache, unpacked.vmlinuz.read_bytes())
        cache.prune(cache_dir, "initramfs-*.cpio.gz", [initramfs_cache])


# ---------------------------------------------------------------- prepare and run

def prepare(release: str | None = None) -> Prepared:
    """Locate or install the tools; find, or fetch and build, the cached kernel and initramfs.

    ``release`` pins the kernel (``6.1.0-56-amd64``); by default the newest in apt's lists.
    """
    located = ensure_tools(TOOL_PACKAGES)
    tools = Tools(qemu=located["qemu-system-x86_64"], busybox=located["busybox"], cpio=located["cpio"])
    root = cache_root()
    key = _base_key(tools.busybox)
    release, package = kernel.resolve_kernel(root, lambda d: all(p.exists() for p in _cached(d, key)),
                                             release)
    cache_dir = root / release
    vmlinuz, base = _cached(cache_dir, key)
    if package is not None:
        build_kernel_cache(package, tools, cache_dir, key)
    say(f"kernel {release}, cache {cache_dir} ({'built now' if package else 'reused'})")
    return Prepared(tools, release, cache_dir, vmlinuz, base, package is None)


def run(argv: list[str], release: str | None, memory_mib: int, cpus: int, timeout: float,
        kvm_amd_parameters: str = "") -> int:
    """Prepare, then run ``argv`` on kvm_amd (loaded with ``kvm_amd_parameters``) in the caller's directory
    and environment."""
    check_kvm_amd_parameters(kvm_amd_parameters)
    prepared = prepare(release)
    markers = Markers.fresh()
    env = initramfs.guest_environment(os.environ, sys.stdout.isatty())
    script = initramfs.command_script(argv, os.getcwd(), env)
    with tempfile.TemporaryDirectory(prefix="pykvm-tcg-amd-run-") as directory:
        initrd = initramfs.run_initrd(prepared.initramfs, init_script(markers, kvm_amd_parameters), script,
                                      Path(directory), prepared.tools.cpio)
        command = qemu.qemu_command(prepared.tools.qemu, prepared.vmlinuz, initrd, memory_mib, cpus)
        return emulator.boot(command, markers, timeout, sys.stdout.buffer, NAME,
                             slow_hint="Raise --timeout if the command is just slow under TCG",
                             known_aborts=qemu.KNOWN_ABORTS)
