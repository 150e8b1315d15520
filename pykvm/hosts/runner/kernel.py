"""The guest's kernel: choosing a Debian kernel package, fetching and unpacking it, and its modules.

Why this exists: a runner boots a stock Debian kernel and loads the KVM vendor
module and what it needs from that kernel's own modules. The choices (which
package, which modules in which order) are pure functions of apt's output and
the modules' ``.modinfo``; fetching and unpacking are the small side effects
around them.
"""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .console import tail_lines
from .elf import elf_section
from .errors import InitramfsError, KernelUnavailable, MirrorUnreachable
from .tools import apt, apt_update, is_root, offline, run, say

KERNEL_PACKAGE_PATTERN = r"^linux-image-[0-9].*-amd64"
# A kernel release: 6.1.0-56-amd64 or 6.12.117+deb12-amd64, not a meta-package (6.12-amd64).
_KERNEL_PACKAGE = re.compile(r"^linux-image-(\d+\.\d+\.\d+(?:[-+][0-9a-z.~+]+)?-amd64)(-unsigned)?$")


@dataclasses.dataclass(frozen=True)
class KernelPackage:
    """A Debian kernel image package and the kernel release it installs (``uname -r``)."""

    name: str
    release: str


@dataclasses.dataclass(frozen=True)
class UnpackedKernel:
    """A kernel package unpacked: its ``vmlinuz`` and its module tree."""

    vmlinuz: Path
    modules_dir: Path


# ---------------------------------------------------------------- choosing the package

def kernel_release_key(release: str) -> tuple[int, ...]:
    """Sort key of a kernel release: its numbers in order (6.12.117+deb12 > 6.1.0-56)."""
    return tuple(int(number) for number in re.findall(r"\d+", release))


def kernel_packages(apt_cache_search: str) -> dict[str, KernelPackage]:
    """The generic amd64 images in ``apt-cache search`` output, by release; signed preferred.

    Cloud and RT flavours, debug symbols and meta-packages are not candidates.
    """
    found: dict[str, KernelPackage] = {}
    for line in apt_cache_search.splitlines():
        name = line.split(" ", 1)[0]
        match = _KERNEL_PACKAGE.match(name)
        if match and (match.group(1) not in found or not match.group(2)):
            found[match.group(1)] = KernelPackage(name, match.group(1))
    return found


def choose_kernel(packages: Mapping[str, KernelPackage], release: str | None) -> KernelPackage | None:
    """The package of ``release``, or of the newest release when it is None."""
    if release is not None:
        return packages.get(release)
    return packages[max(packages, key=kernel_release_key)] if packages else None


def cached_release(root: Path, complete: Callable[[Path], bool], release: str | None) -> str | None:
    """``release`` (None: the newest) if ``root/<release>`` holds a complete cache (``complete``)."""
    releases = [entry.name for entry in root.glob("*")
                if entry.is_dir() and release in (None, entry.name) and complete(entry)]
    return max(releases, key=kernel_release_key, default=None)


def resolve_kernel(root: Path, complete: Callable[[Path], bool], release: str | None
                   ) -> tuple[str, KernelPackage | None]:
    """The kernel release to boot, and its package when the cache ``root/<release>`` must be built.

    A pinned ``release`` the cache holds is used without asking apt. Otherwise
    the newest (or the pinned) package in apt's lists is chosen, refreshing the
    lists first (as root) when nothing is cached, so that a machine with stale
    lists neither picks a kernel the mirror no longer has nor an old one. When
    apt offers none, the newest complete cache is used.
    """
    if release is not None and cached_release(root, complete, release) is not None:
        return release, None
    if cached_release(root, complete, release) is None and is_root():
        apt_update()
    package = find_kernel_package(release)
    if package is None:
        cached = cached_release(root, complete, release)
        if cached is None:
            wanted = f"linux-image-{release}" if release else f"{KERNEL_PACKAGE_PATTERN} package"
            raise KernelUnavailable(
                f"apt's lists have no {wanted} and {root} does not hold it; run `apt-get update` "
                f"as root (it needs the Debian mirror), or pick a release that "
                f"`apt-cache search --names-only '{KERNEL_PACKAGE_PATTERN}'` lists, then retry")
        return cached, None
    return package.release, None if complete(root / package.release) else package


def find_kernel_package(release: str | None) -> KernelPackage | None:
    """The kernel image of ``release`` (None: the newest) in apt's lists, updating them first
    (as root) if it is not there."""
    search = ("apt-cache", "search", "--names-only", KERNEL_PACKAGE_PATTERN)
    package = choose_kernel(kernel_packages(apt(*search).stdout), release)
    if package is None and is_root():
        apt_update()
        package = choose_kernel(kernel_packages(apt(*search).stdout), release)
    return package


# ---------------------------------------------------------------- fetching it

def download_kernel(package: KernelPackage, work: Path, host: str, cache: Path) -> UnpackedKernel:
    """``apt-get download`` ``package`` into ``work`` and unpack it there.

    ``host`` and ``cache`` name the runner and its cache in the advice given when
    the mirror cannot be reached.
    """
    say(f"downloading {package.name}")
    result = apt("apt-get", "download", package.name, cwd=work)
    if result.returncode != 0 and is_root():      # stale package lists
        apt_update()
        result = apt("apt-get", "download", package.name, cwd=work)
    if result.returncode != 0:
        output = tail_lines(result.stdout, 10)
        if offline(result.stdout):
            raise MirrorUnreachable(
                f"cannot download {package.name}: no network to the Debian mirror. Run "
                f"`python -m pykvm.hosts {host} --prepare` once where the mirror is "
                f"reachable (the cache {cache} is then reused offline)\n{output}")
        raise KernelUnavailable(f"`apt-get download {package.name}` failed; run "
                                f"`apt-get update` as root and retry\n{output}")
    debs = list(work.glob("*.deb"))
    unpacked = work / "root"
    result = run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
    if result.returncode != 0:
        raise KernelUnavailable(f"dpkg-deb -x {debs[0].name} failed: {result.stdout.strip()}")
    modules_dir = next((path for path in (unpacked / "lib" / "modules" / package.release,
                                          unpacked / "usr" / "lib" / "modules" / package.release)
                        if path.is_dir()), None)
    vmlinuz = unpacked / "boot" / f"vmlinuz-{package.release}"
    if modules_dir is None or not vmlinuz.is_file():
        raise KernelUnavailable(f"{package.name} has no boot/vmlinuz-{package.release} or "
                                f"lib/modules/{package.release}: not a kernel image package")
    return UnpackedKernel(vmlinuz, modules_dir)


# ---------------------------------------------------------------- its modules

def module_name(filename: str) -> str:
    """Kernel module name of a ``.ko[.xz|.gz|.zst]`` file name or path (``kvm-amd`` -> ``kvm_amd``)."""
    return filename.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")


def builtin_modules(modules_builtin: str) -> frozenset[str]:
    """Names of the built-in modules listed in a kernel's ``modules.builtin``."""
    return frozenset(module_name(line) for line in modules_builtin.split())


def modinfo_depends(modinfo: bytes) -> list[str]:
    """The ``depends=`` list of a module's ``.modinfo`` section (NUL-separated key=value)."""
    for field in modinfo.split(b"\0"):
        if field.startswith(b"depends="):
            return [module_name(name) for name in field[8:].decode().split(",") if name]
    return []


def load_order(roots: Iterable[str], depends: Callable[[str], list[str]],
               builtin: frozenset[str]) -> list[str]:
    """Modules to insmod, dependencies first, skipping built-in ones."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in builtin or name in order:
            return
        for dependency in depends(name):
            visit(dependency)
        order.append(name)

    for root in roots:
        visit(module_name(root))
    return order


def read_module(path: Path) -> bytes:
    """A module file's ELF image, decompressed from ``.ko.xz`` / ``.ko.gz`` (busybox insmod reads plain ELF)."""
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise InitramfsError(f"{path.name}: pykvm.hosts decompresses only .ko.xz and .ko.gz modules; "
                         f"pick a kernel package whose modules use one of them")


def collect_modules(modules_dir: Path, roots: Iterable[str]) -> tuple[list[str], dict[str, bytes]]:
    """The load order of ``roots`` and their dependencies in an unpacked kernel's module tree, and
    their images."""
    files = {module_name(path.name): path for path in modules_dir.rglob("*.ko*")}
    builtin = builtin_modules((modules_dir / "modules.builtin").read_text())
    images: dict[str, bytes] = {}

    def depends(name: str) -> list[str]:
        if name not in files:
            raise InitramfsError(f"kernel module {name} is neither built into {modules_dir.name} "
                                 f"nor shipped with it; choose another kernel package")
        images[name] = read_module(files[name])
        return modinfo_depends(elf_section(images[name], ".modinfo"))

    order = load_order(roots, depends, builtin)
    return order, images
