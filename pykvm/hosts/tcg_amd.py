"""``python -m pykvm.hosts tcg-amd -- COMMAND``: run a command on a second KVM host, kvm_amd.

Why this exists: a machine may offer only one KVM, such as kvm_pvm, whose interrupt
semantics differ from the architecture (:mod:`pykvm.hosts.conformance`). The
upstream ``kvm_amd`` module is the standard host to compare with, and QEMU's
software emulation (TCG) of AMD-V lets it run here: a stock Debian kernel
boots under ``qemu-system-x86_64 -accel tcg -cpu max``, loads ``kvm_amd``,
mounts this machine's ``/`` over 9p and runs the command chrooted into it, in
the caller's working directory with the caller's Python and virtualenv
The command's exit status comes back as the runner's.

Pieces, and where they come from:

* ``qemu-system-x86_64``, a static ``busybox`` and ``cpio``: Debian packages
  ``qemu-system-x86``, ``busybox-static``, ``cpio``, installed with apt-get
  when missing and running as root.
* The newest ``linux-image-<version>-amd64`` in apt's lists, fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x``. Its ``vmlinuz`` and
  an initramfs (busybox plus the modules ``kvm_amd``, 9p and overlayfs need,
  decompressed) are cached in ``$XDG_CACHE_HOME/pykvm/tcg-amd/<version>/``.
* Per run, a second small archive holding ``/init`` and the command script is
  appended to the cached initramfs (the kernel unpacks concatenated archives).

Inside the guest, the host's root is the read-only lower layer of an overlay
whose upper layer is guest RAM: every path is writable there and every write
is discarded at power-off. The command's stdout and stderr share the serial
console, which is streamed to the caller's stdout; the runner's own messages
go to stderr.

This module keeps the decisions in pure functions (kernel choice, module load
order, the ``/init`` and command scripts, the QEMU command line, the console
filter) and the side effects (apt, dpkg-deb, cpio, QEMU) in small functions
around them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import lzma
import os
import re
import secrets
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping, Sequence

from ..core.errors import PyKvmError

HOSTS = ("tcg-amd",)
DEFAULT_TIMEOUT = 1200.0
DEFAULT_MEMORY_MIB = 2048
# pykvm's SMP tests run 2 vCPUs in 2 threads, and kvm_amd runs them with -smp 2.
# The guest's vCPUs share one host thread (TCG's thread=single, see qemu_command).
DEFAULT_CPUS = 2

EXIT_TIMEOUT = 124            # as timeout(1)
EXIT_RUNNER_FAILED = 125      # the guest never reported the command's status
EXIT_INTERRUPTED = 130        # Ctrl-C

# Debian package of each tool the runner needs.
TOOL_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "busybox": "busybox-static",
                 "cpio": "cpio"}
# Modules the guest loads (with their dependencies), unless built in.
MODULE_ROOTS = ("kvm_amd", "virtio_pci", "9pnet_virtio", "9p", "overlay")
KERNEL_PACKAGE_PATTERN = r"^linux-image-[0-9].*-amd64"
# A kernel release: 6.1.0-56-amd64 or 6.12.117+deb12-amd64, not a meta-package (6.12-amd64).
_KERNEL_PACKAGE = re.compile(r"^linux-image-(\d+\.\d+\.\d+(?:[-+][0-9a-z.~+]+)?-amd64)(-unsigned)?$")
_OFFLINE_SIGNS = ("Could not resolve", "Temporary failure resolving", "Failed to fetch",
                  "Could not connect", "Unable to connect", "Connection failed",
                  "Network is unreachable", "Connection timed out")
# Changing the base initramfs's layout must change its cache key.
_BASE_LAYOUT = "busybox at /bin, decompressed modules and load-order in /lib/modules, v1"
_ENV_NAMES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM",
                        "VIRTUAL_ENV", "CI", "NO_COLOR", "FORCE_COLOR", "PY_COLORS"})
_ENV_PREFIXES = ("LC_", "PYTHON", "PYKVM_", "PYTEST_")
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TAIL_BYTES = 16384
# Terminal escape sequences (SeaBIOS resets and clears the screen) and control characters.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b.|[\x00-\x08\x0b-\x1f\x7f]")
_TAIL_LINES = 40


class HostRunnerError(PyKvmError):
    """The runner could not prepare or boot the test host."""


class MissingTool(HostRunnerError):
    """A tool the runner needs is not installed and could not be installed."""


class KernelUnavailable(HostRunnerError):
    """No usable Debian kernel package (none in apt's lists, or not unpackable)."""


class MirrorUnreachable(KernelUnavailable):
    """apt could not reach the Debian mirror to fetch the kernel package."""


class InitramfsError(HostRunnerError):
    """A kernel module the guest needs is missing or unreadable."""


class GuestFailed(HostRunnerError):
    """The guest stopped without reporting the command's exit status; ``tail`` is its console."""

    def __init__(self, message: str, tail: str) -> None:
        super().__init__(f"{message}\n--- last lines of the guest console ---\n{tail}")
        self.tail = tail


class GuestTimeout(GuestFailed):
    """The guest did not finish within ``--timeout``; QEMU was killed."""


# ---------------------------------------------------------------- records

@dataclasses.dataclass(frozen=True)
class Tools:
    """The located executables."""

    qemu: Path
    busybox: Path
    cpio: Path


@dataclasses.dataclass(frozen=True)
class KernelPackage:
    """A Debian kernel image package and the kernel release it installs (``uname -r``)."""

    name: str
    release: str


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything needed to boot: tools, the cached kernel and base initramfs."""

    tools: Tools
    release: str
    cache_dir: Path
    vmlinuz: Path
    initramfs: Path
    reused: bool


@dataclasses.dataclass(frozen=True)
class Markers:
    """Console lines ``/init`` prints; the nonce keeps the command's output from forging them."""

    nonce: str

    @property
    def start(self) -> str:
        return f"PYKVM-HOSTS-START-{self.nonce}"

    @property
    def exit(self) -> str:
        return f"PYKVM-HOSTS-EXIT-STATUS-{self.nonce}="

    @property
    def error(self) -> str:
        return f"PYKVM-HOSTS-ERROR-{self.nonce}: "

    @classmethod
    def fresh(cls) -> "Markers":
        return cls(secrets.token_hex(8))


# ---------------------------------------------------------------- pure functions

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


def module_name(filename: str) -> str:
    """Kernel module name of a ``.ko[.xz|.gz|.zst]`` file name or path (``kvm-amd`` -> ``kvm_amd``)."""
    return filename.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")


def builtin_modules(modules_builtin: str) -> frozenset[str]:
    """Names of the built-in modules listed in a kernel's ``modules.builtin``."""
    return frozenset(module_name(line) for line in modules_builtin.split())


def elf_section(image: bytes, name: str) -> bytes:
    """The contents of section ``name`` of a 64-bit little-endian ELF file."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)

    def header(index: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQIIQQ", image, shoff + index * shentsize)

    names = header(shstrndx)[4]
    for index in range(shnum):
        fields = header(index)
        start = names + fields[0]
        if image[start:image.index(b"\0", start)] == name.encode():
            return image[fields[4]:fields[4] + fields[5]]
    raise ValueError(f"no {name} section")


def is_static_elf(image: bytes) -> bool:
    """True for a 64-bit ELF executable without a program interpreter (statically linked)."""
    if image[:4] != b"\x7fELF" or image[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    pt_interp = 3
    return all(struct.unpack_from("<I", image, phoff + i * phentsize)[0] != pt_interp
               for i in range(phnum))


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


def guest_environment(environ: Mapping[str, str], stdout_is_tty: bool) -> dict[str, str]:
    """The caller's variables the command sees in the guest.

    Passed: PATH, HOME, USER, LOGNAME, LANG, LANGUAGE, TZ, TERM, VIRTUAL_ENV, CI,
    NO_COLOR, FORCE_COLOR, PY_COLORS and every LC_*, PYTHON*, PYKVM_*, PYTEST_*
    variable. Python writes no bytecode (the writes would be discarded). The
    command's stdout is the guest's serial console, a terminal: when the
    caller's stdout is not one, TERM=dumb keeps colour codes out of it.
    """
    env = {name: value for name, value in environ.items()
           if _SHELL_NAME.match(name) and (name in _ENV_NAMES or name.startswith(_ENV_PREFIXES))}
    env.setdefault("PATH", _DEFAULT_PATH)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if not stdout_is_tty:
        env["TERM"] = "dumb"
    return env


def command_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The ``sh`` script that runs ``argv`` in ``cwd`` with exactly ``env``; all of it quoted."""
    if not argv:
        raise ValueError("no command to run")
    lines = [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines.append(f"cd {shlex.quote(cwd)} || exit {EXIT_RUNNER_FAILED}")
    lines.append(f"exec {shlex.join(argv)}")
    return "\n".join(lines) + "\n"


def init_script(markers: Markers) -> str:
    """The guest's ``/init``: load kvm_amd, overlay the host's root, run /command.sh, power off.

    Failures print the error marker and power off; the command's status is
    printed after the exit marker. ``stty -onlcr`` keeps the console from
    turning the command's ``\\n`` into ``\\r\\n``; ``dmesg -n 1`` keeps kernel
    messages (other than panics) out of its output.
    """
    return f"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
fail() {{
    echo "{markers.error}$*"
    poweroff -f
}}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module.ko" || fail "insmod $module failed (see the kernel messages above)"
done
[ -c /dev/kvm ] || fail "kvm_amd loaded but /dev/kvm is missing: does QEMU's -cpu offer SVM?"
mkdir -p /lower /rw /host
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose hostroot /lower \\
    || fail "cannot mount the host's root over 9p (mount tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount the overlay's tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /host \\
    || fail "cannot mount the overlay on the host's root"
mount -t proc proc /host/proc || fail "cannot mount /proc in the host's root"
mount -t sysfs sysfs /host/sys || fail "cannot mount /sys in the host's root"
mount -t devtmpfs devtmpfs /host/dev || fail "cannot mount /dev in the host's root"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts || fail "cannot mount /dev/pts in the host's root"
mount -t tmpfs tmpfs /host/dev/shm || fail "cannot mount /dev/shm in the host's root"
stty -onlcr
dmesg -n 1
echo "{markers.start}"
env -i /bin/chroot /host /bin/sh -c "$(cat /command.sh)" </dev/null
echo "{markers.exit}$?"
poweroff -f
"""


def qemu_command(qemu: Path, vmlinuz: Path, initrd: Path, memory_mib: int, cpus: int) -> list[str]:
    """The QEMU command line: TCG with AMD-V (``-cpu max``), serial console on stdio, no network.

    ``thread=single``: under multi-threaded TCG (QEMU 7.2, -smp 2) no pytest
    run of pykvm's suite finished. With kernel 6.12 the guest died every time
    (3 of 3) with "Oops: int3" in ``__schedule``, apparently a vCPU running
    stale translated code that still holds the temporary INT3 of a text patch
    (creating and destroying VMs flips the preempt-notifier static key there);
    with 6.1 both vCPUs hung in soft lockups. Round-robin TCG keeps -smp 2 and
    runs the suite.
    """
    return [
        str(qemu), "-accel", "tcg,thread=single", "-cpu", "max",
        "-m", str(memory_mib), "-smp", str(cpus),
        "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1 rdinit=/init",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
    ]


def offline(apt_output: str) -> bool:
    """True when apt's output says it could not reach the mirror."""
    return any(sign in apt_output for sign in _OFFLINE_SIGNS)


def tail_lines(text: str, lines: int = _TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.splitlines()[-lines:])


class ConsoleFilter:
    """Turns the guest's serial console into the command's output and exit status.

    ``feed(bytes)`` returns the bytes to pass to the caller: nothing before the
    start marker (boot noise), everything after it up to the exit marker. A
    partial marker at the end of a chunk is held back until the next chunk
    shows whether it is one. ``exit_status`` is set once the exit marker's line
    is complete; ``error`` holds ``/init``'s error message, if it printed one.
    """

    def __init__(self, markers: Markers) -> None:
        self.started = False
        self.exit_status: int | None = None
        self.error: str | None = None
        self._start = markers.start.encode()
        self._exit = markers.exit.encode()
        self._error = markers.error.encode()
        self._pending = b""
        self._tail = b""

    @property
    def tail(self) -> str:
        """The console's last lines, without carriage returns and terminal escape sequences."""
        return tail_lines(_CONTROL.sub("", self._tail.decode(errors="replace")))

    def feed(self, data: bytes) -> bytes:
        self._tail = (self._tail + data)[-_TAIL_BYTES:]
        if self.exit_status is not None:
            return b""
        self._pending += data
        if not self.started:
            return self._before_start()
        return self._after_start()

    def _before_start(self) -> bytes:
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if self._error in line:
                self.error = line.split(self._error, 1)[1].decode(errors="replace")
            if line.endswith(self._start):
                self.started = True
                return self._after_start()
        return b""

    def _after_start(self) -> bytes:
        at = self._pending.find(self._exit)
        if at >= 0:
            output, rest = self._pending[:at], self._pending[at + len(self._exit):]
            if b"\n" in rest:
                self.exit_status = int(rest.split(b"\n", 1)[0].strip())
                self._pending = b""
            else:
                self._pending = self._pending[at:]
            return output
        held = next((k for k in range(min(len(self._exit) - 1, len(self._pending)), 0, -1)
                     if self._pending.endswith(self._exit[:k])), 0)
        cut = len(self._pending) - held
        output, self._pending = self._pending[:cut], self._pending[cut:]
        return output


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the runner's arguments at the first ``--``: (runner options, command)."""
    if "--" not in argv:
        return list(argv), []
    at = list(argv).index("--")
    return list(argv[:at]), list(argv[at + 1:])


# ---------------------------------------------------------------- tools and apt

def _say(message: str) -> None:
    print(f"pykvm.hosts: {message}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _is_root() -> bool:
    return os.geteuid() == 0


def _apt(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = args[0]
    if shutil.which(tool) is None:
        raise MissingTool(f"{tool} not found: the tcg-amd host takes its QEMU, busybox and kernel "
                          f"from Debian's archive, so it needs Debian or Ubuntu with apt")
    return _run(args, cwd)


def _apt_update() -> subprocess.CompletedProcess[str]:
    _say("apt-get update")
    return _apt("apt-get", "update")


def locate_tool(name: str) -> Path | None:
    """The executable ``name``; for busybox, only a statically linked one (it runs in the initramfs)."""
    if name != "busybox":
        found = shutil.which(name)
        return Path(found) if found else None
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and os.path.isfile(candidate):
            with open(candidate, "rb") as file:
                if is_static_elf(file.read(65536)):
                    return Path(candidate)
    return None


def ensure_tools() -> Tools:
    """Locate QEMU, a static busybox and cpio, installing their packages as root when missing."""
    missing = [name for name in TOOL_PACKAGES if locate_tool(name) is None]
    if missing:
        packages = [TOOL_PACKAGES[name] for name in missing]
        install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
        fix = f"run `{'' if _is_root() else 'sudo '}{shlex.join(install)}`"
        if not _is_root():
            raise MissingTool(f"{', '.join(missing)} not found (Debian packages "
                              f"{', '.join(packages)}); {fix}")
        _say(f"installing {' '.join(packages)}")
        result = _apt(*install)
        if result.returncode != 0:           # stale or missing package lists
            _apt_update()
            result = _apt(*install)
        if result.returncode != 0:
            cause = "apt cannot reach the Debian mirror" if offline(result.stdout) else "apt-get failed"
            raise MissingTool(f"{', '.join(missing)} not found and {cause}; {fix}\n"
                              f"{tail_lines(result.stdout, 10)}")
    located = {name: locate_tool(name) for name in TOOL_PACKAGES}
    still = [name for name, path in located.items() if path is None]
    if still:
        raise MissingTool(f"{', '.join(still)} still not found after installing "
                          f"{', '.join(TOOL_PACKAGES[n] for n in still)}")
    return Tools(qemu=located["qemu-system-x86_64"], busybox=located["busybox"],
                 cpio=located["cpio"])


def find_kernel_package(release: str | None) -> KernelPackage | None:
    """The kernel image of ``release`` (None: the newest) in apt's lists, updating them first
    (as root) if it is not there."""
    search = ("apt-cache", "search", "--names-only", KERNEL_PACKAGE_PATTERN)
    package = choose_kernel(kernel_packages(_apt(*search).stdout), release)
    if package is None and _is_root():
        _apt_update()
        package = choose_kernel(kernel_packages(_apt(*search).stdout), release)
    return package


# ---------------------------------------------------------------- cache and initramfs

def cache_root() -> Path:
    """``$XDG_CACHE_HOME/pykvm/tcg-amd``, else ``~/.cache/pykvm/tcg-amd``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pykvm" / "tcg-amd"


def _base_key(busybox: Path) -> str:
    digest = hashlib.sha256(_BASE_LAYOUT.encode() + repr(MODULE_ROOTS).encode())
    digest.update(busybox.read_bytes())
    return digest.hexdigest()[:12]


def _cached(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / "vmlinuz", cache_dir / f"initramfs-{key}.cpio.gz"


def _cached_release(root: Path, key: str, release: str | None) -> str | None:
    """``release`` (None: the newest) if the cache holds it complete."""
    releases = [entry.name for entry in root.glob("*")
                if release in (None, entry.name) and all(p.exists() for p in _cached(entry, key))]
    return max(releases, key=kernel_release_key, default=None)


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


def collect_modules(modules_dir: Path) -> tuple[list[str], dict[str, bytes]]:
    """The load order of ``MODULE_ROOTS`` in an unpacked kernel's module tree, and their images."""
    files = {module_name(path.name): path for path in modules_dir.rglob("*.ko*")}
    builtin = builtin_modules((modules_dir / "modules.builtin").read_text())
    images: dict[str, bytes] = {}

    def depends(name: str) -> list[str]:
        if name not in files:
            raise InitramfsError(f"kernel module {name} is neither built into {modules_dir.name} "
                                 f"nor shipped with it; choose another kernel package")
        images[name] = read_module(files[name])
        return modinfo_depends(elf_section(images[name], ".modinfo"))

    order = load_order(MODULE_ROOTS, depends, builtin)
    return order, images


def cpio_gz(tree: Path, cpio: Path) -> bytes:
    """``tree`` as a gzip-compressed newc cpio archive, every file owned by root."""
    names = sorted(str(path.relative_to(tree)) for path in tree.rglob("*"))
    result = subprocess.run([str(cpio), "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=tree,
                            input="\n".join(names).encode() + b"\n", capture_output=True)
    if result.returncode != 0:
        raise HostRunnerError(f"cpio failed: {result.stderr.decode(errors='replace').strip()}")
    return gzip.compress(result.stdout, compresslevel=6)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def build_kernel_cache(package: KernelPackage, tools: Tools, cache_dir: Path, key: str) -> None:
    """Download and unpack ``package``; cache its vmlinuz and the base initramfs in ``cache_dir``."""
    with tempfile.TemporaryDirectory(prefix="pykvm-tcg-amd-") as work_name:
        work = Path(work_name)
        _say(f"downloading {package.name}")
        result = _apt("apt-get", "download", package.name, cwd=work)
        if result.returncode != 0 and _is_root():      # stale package lists
            _apt_update()
            result = _apt("apt-get", "download", package.name, cwd=work)
        if result.returncode != 0:
            output = tail_lines(result.stdout, 10)
            if offline(result.stdout):
                raise MirrorUnreachable(
                    f"cannot download {package.name}: no network to the Debian mirror. Run "
                    f"`python -m pykvm.hosts tcg-amd --prepare` once where the mirror is "
                    f"reachable (the cache {cache_dir.parent} is then reused offline)\n{output}")
            raise KernelUnavailable(f"`apt-get download {package.name}` failed; run "
                                    f"`apt-get update` as root and retry\n{output}")
        debs = list(work.glob("*.deb"))
        unpacked = work / "root"
        result = _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)])
        if result.returncode != 0:
            raise KernelUnavailable(f"dpkg-deb -x {debs[0].name} failed: {result.stdout.strip()}")
        modules_dir = next((path for path in (unpacked / "lib" / "modules" / package.release,
                                              unpacked / "usr" / "lib" / "modules" / package.release)
                            if path.is_dir()), None)
        vmlinuz = unpacked / "boot" / f"vmlinuz-{package.release}"
        if modules_dir is None or not vmlinuz.is_file():
            raise KernelUnavailable(f"{package.name} has no boot/vmlinuz-{package.release} or "
                                    f"lib/modules/{package.release}: not a kernel image package")
        order, images = collect_modules(modules_dir)
        tree = work / "initramfs"
        for directory in ("bin", "dev", "proc", "sys", "lib/modules"):
            (tree / directory).mkdir(parents=True)
        shutil.copy(tools.busybox, tree / "bin" / "busybox")
        (tree / "bin" / "sh").symlink_to("busybox")
        for name in order:
            (tree / "lib" / "modules" / f"{name}.ko").write_bytes(images[name])
        (tree / "lib" / "modules" / "load-order").write_text("\n".join(order) + "\n")
        cache_dir.mkdir(parents=True, exist_ok=True)
        vmlinuz_cache, initramfs_cache = _cached(cache_dir, key)
        _write_atomically(initramfs_cache, cpio_gz(tree, tools.cpio))
        _write_atomically(vmlinuz_cache, vmlinuz.read_bytes())


def prepare(release: str | None = None) -> Prepared:
    """Locate or install the tools; find, or fetch and build, the cached kernel and initramfs.

    ``release`` pins the kernel (``6.1.0-56-amd64``); by default the newest in apt's lists.
    """
    tools = ensure_tools()
    root = cache_root()
    key = _base_key(tools.busybox)
    pinned_and_cached = release is not None and _cached_release(root, key, release) is not None
    if _cached_release(root, key, release) is None and _is_root():
        # Nothing cached: a kernel will be downloaded. Refresh apt's lists first, so that
        # a machine with stale lists neither picks a kernel the mirror no longer has nor
        # an old one.
        _apt_update()
    package = None if pinned_and_cached else find_kernel_package(release)
    if package is None:
        cached = _cached_release(root, key, release)
        if cached is None:
            wanted = f"linux-image-{release}" if release else f"{KERNEL_PACKAGE_PATTERN} package"
            raise KernelUnavailable(
                f"apt's lists have no {wanted} and {root} does not hold it; run `apt-get update` "
                f"as root (it needs the Debian mirror), or pick a release that "
                f"`apt-cache search --names-only '{KERNEL_PACKAGE_PATTERN}'` lists, then retry")
        release = cached
    else:
        release = package.release
    cache_dir = root / release
    vmlinuz, initramfs = _cached(cache_dir, key)
    reused = vmlinuz.exists() and initramfs.exists()
    if not reused:
        assert package is not None            # a release without a package is a cached one
        build_kernel_cache(package, tools, cache_dir, key)
    _say(f"kernel {release}, cache {cache_dir} ({'reused' if reused else 'built now'})")
    return Prepared(tools, release, cache_dir, vmlinuz, initramfs, reused)


def run_initrd(prepared: Prepared, markers: Markers, script: str, directory: Path) -> Path:
    """The cached initramfs with this run's ``/init`` and ``/command.sh`` appended, in ``directory``."""
    tree = directory / "run"
    tree.mkdir()
    (tree / "init").write_text(init_script(markers))
    (tree / "init").chmod(0o755)
    (tree / "command.sh").write_text(script)
    initrd = directory / "initrd.cpio.gz"
    initrd.write_bytes(prepared.initramfs.read_bytes() + cpio_gz(tree, prepared.tools.cpio))
    return initrd


# ---------------------------------------------------------------- boot

def boot(command: list[str], markers: Markers, timeout: float, output: BinaryIO) -> int:
    """Run QEMU, stream the command's output to ``output``, return the command's exit status."""
    console = ConsoleFilter(markers)
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryFile() as qemu_stderr:
        qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=qemu_stderr)
        try:
            _pump(qemu, console, deadline, output)
            qemu.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        if console.exit_status is not None:
            return console.exit_status
        if time.monotonic() >= deadline:
            raise GuestTimeout(f"the tcg-amd guest did not finish within {timeout:g} s; QEMU was "
                               f"killed. Raise --timeout if the command is just slow under TCG",
                               console.tail)
        qemu_stderr.seek(0)
        errors = qemu_stderr.read().decode(errors="replace").strip()
        if console.error:
            reason = f"/init failed: {console.error}"
        elif not console.started:
            reason = "the guest stopped before running the command (kernel panic or QEMU error?)"
        else:
            reason = "the guest stopped while the command ran (kernel panic?)"
        raise GuestFailed(f"the tcg-amd guest reported no exit status: {reason}; QEMU exited "
                          f"with {qemu.returncode}" + (f", saying: {errors}" if errors else ""),
                          console.tail)


def _pump(qemu: subprocess.Popen, console: ConsoleFilter, deadline: float, output: BinaryIO) -> None:
    """Copy QEMU's console through ``console`` to ``output`` until EOF or the deadline."""
    assert qemu.stdout is not None
    fd = qemu.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(remaining):
                continue
            data = os.read(fd, 65536)
            if not data:
                return
            passed = console.feed(data)
            if passed:
                output.write(passed)
                output.flush()


def run(argv: list[str], release: str | None, memory_mib: int, cpus: int, timeout: float) -> int:
    """Prepare, then run ``argv`` on kvm_amd in the caller's directory and environment."""
    prepared = prepare(release)
    markers = Markers.fresh()
    env = guest_environment(os.environ, sys.stdout.isatty())
    script = command_script(argv, os.getcwd(), env)
    with tempfile.TemporaryDirectory(prefix="pykvm-tcg-amd-run-") as directory:
        initrd = run_initrd(prepared, markers, script, Path(directory))
        command = qemu_command(prepared.tools.qemu, prepared.vmlinuz, initrd, memory_mib, cpus)
        return boot(command, markers, timeout, sys.stdout.buffer)


# ---------------------------------------------------------------- command line

_EPILOG = f"""\
examples:
  python -m pykvm.hosts tcg-amd --prepare
  python -m pykvm.hosts tcg-amd -- .venv/bin/python -m pytest -q

tcg-amd boots a Debian kernel under QEMU's TCG emulation of AMD-V, loads
kvm_amd, and runs COMMAND chrooted into this machine's / (shared read-only
over 9p, made writable by an overlay in guest RAM whose writes are
discarded), in the current directory, with PATH, HOME, USER, LOGNAME, LANG,
LANGUAGE, TZ, TERM, VIRTUAL_ENV, CI, NO_COLOR, FORCE_COLOR, PY_COLORS and
every LC_*, PYTHON*, PYKVM_*, PYTEST_* variable, plus
PYTHONDONTWRITEBYTECODE=1 (and TERM=dumb when stdout is not a terminal).
stdin is /dev/null; stdout and stderr both arrive on stdout.

Missing Debian packages (qemu-system-x86, busybox-static, cpio) are
installed with apt-get when running as root. The newest linux-image-*-amd64
in apt's lists is downloaded once and cached with its initramfs in
$XDG_CACHE_HOME/pykvm/tcg-amd (default ~/.cache/pykvm/tcg-amd).

exit status: COMMAND's own; {EXIT_TIMEOUT} on timeout; {EXIT_RUNNER_FAILED} when the host could
not be prepared or the guest reported no status (kvm_amd did not load,
kernel panic); {EXIT_INTERRUPTED} on Ctrl-C. QEMU is killed in every case.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pykvm.hosts",
        usage="%(prog)s HOST [options] (--prepare | -- COMMAND [ARG ...])",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", choices=HOSTS, help="the KVM host to run on")
    parser.add_argument("--prepare", action="store_true",
                        help="only install the tools and fetch/build the cached kernel and "
                             "initramfs (for CI to call first)")
    parser.add_argument("--kernel", metavar="RELEASE",
                        help="Debian kernel release to boot, e.g. 6.1.0-56-amd64 (default: the "
                             "newest linux-image-*-amd64 in apt's lists)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"kill QEMU after this long (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, metavar="MiB",
                        help=f"guest memory (default {DEFAULT_MEMORY_MIB})")
    parser.add_argument("--cpus", type=int, default=DEFAULT_CPUS, metavar="N",
                        help=f"guest vCPUs (default {DEFAULT_CPUS})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options, command = split_command(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(options)
    if not args.prepare and not command:
        parser.error("give the command to run after --, or --prepare")
    if args.cpus < 1 or args.memory < 256 or args.timeout <= 0:
        parser.error("--cpus must be >= 1, --memory >= 256 and --timeout > 0")
    # SIGTERM unwinds like Ctrl-C, so QEMU is killed rather than orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.prepare:
            prepare(args.kernel)
            return 0
        return run(command, args.kernel, args.memory, args.cpus, args.timeout)
    except GuestTimeout as exc:
        _say(str(exc))
        return EXIT_TIMEOUT
    except HostRunnerError as exc:
        _say(f"{type(exc).__name__}: {exc}")
        return EXIT_RUNNER_FAILED
    except KeyboardInterrupt:
        _say("interrupted; QEMU was killed")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
