"""The guest's initramfs: busybox and the modules (cached), then per run ``/init`` and the command.

Why this exists: the guest kernel needs a userspace that loads the vendor
module, puts the host's root under an overlay, runs the caller's command in
it with the caller's environment, and reports its status on the console. The
base archive (busybox, decompressed modules, their load order) is built once
per kernel; each run appends a small second archive holding ``/init`` and
``/command.sh`` (the kernel unpacks concatenated archives). The scripts are
pure functions of their inputs.
"""

from __future__ import annotations

import gzip
import re
import shlex
import shutil
import struct
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .console import Markers
from .errors import EXIT_RUNNER_FAILED, HostRunnerError

_ENV_NAMES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM",
                        "VIRTUAL_ENV", "CI", "NO_COLOR", "FORCE_COLOR", "PY_COLORS"})
_ENV_PREFIXES = ("LC_", "PYTHON", "PYKVM_", "PYTEST_")
_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Changing the base archive's layout must change the key it is cached under.
BASE_LAYOUT = "busybox at /bin, decompressed modules and load-order in /lib/modules, v1"


# ---------------------------------------------------------------- the command

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


# /init's default module loading: every module of the base archive, in load order.
LOAD_MODULES = """for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module.ko" || fail "insmod $module failed (see the kernel messages above)"
done"""


def init_script(markers: Markers, mount_lower: str, no_kvm: str, load_modules: str = LOAD_MODULES) -> str:
    """The guest's ``/init``: load the modules, overlay the host's root, run /command.sh, power off.

    ``mount_lower`` is the shell command that mounts the host's root read-only on
    ``/lower`` (it may call ``fail``); ``no_kvm`` the error when ``/dev/kvm`` is
    missing after the modules loaded; ``load_modules`` loads them (and, for a host
    that reads its command from a disk, writes ``/command.sh``). The markers'
    nonce may be a shell expansion (``$nonce``) that ``load_modules`` sets.
    Failures print the error marker and power off; the command's status is
    printed after the exit marker. ``stty -onlcr`` keeps the console from
    turning the command's ``\\n`` into ``\\r\\n``; ``dmesg -n 1`` keeps kernel
    messages (other than panics) out of its output. The last ``stty`` waits
    until the console has sent everything (it sets the mode with TCSADRAIN):
    ``poweroff -f`` does not, and a slow UART would lose the output's tail.
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
{load_modules}
[ -c /dev/kvm ] || fail "{no_kvm}"
mkdir -p /lower /rw /host
{mount_lower}
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
# As systemd would: the unified cgroup hierarchy (the lab checker caps a check's tasks with its pids controller).
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || fail "cannot mount the cgroup2 hierarchy in the host's root"
# What udev or systemd would add (devtmpfs has none of them): bash's <(...) opens /dev/fd/N
# (kvm-unit-tests' x86/run uses it), and scripts read /dev/stdin.
ln -s /proc/self/fd /host/dev/fd && ln -s fd/0 /host/dev/stdin && ln -s fd/1 /host/dev/stdout \
    && ln -s fd/2 /host/dev/stderr || fail "cannot link /dev/fd and /dev/std* in the host's root"
stty -onlcr
dmesg -n 1
echo "{markers.start}"
env -i /bin/chroot /host /bin/sh -c "$(cat /command.sh)" </dev/null
echo "{markers.exit}$?"
stty -onlcr
poweroff -f
"""


_SIGNATURE_MAGIC = b"~Module signature appended~\n"


def strip_module_signature(image: bytes) -> bytes:
    """A module without its appended signature (``struct module_signature`` and the magic at its end).

    The kernel then loads it without verifying it (and taints itself 'E'):
    verification hashes the whole module, slow under an emulator.
    """
    if not image.endswith(_SIGNATURE_MAGIC):
        return image
    info_end = len(image) - len(_SIGNATURE_MAGIC)
    sig_len, = struct.unpack_from(">I", image, info_end - 4)    # module_signature.sig_len (big-endian)
    return image[:info_end - 12 - sig_len]


# ---------------------------------------------------------------- the archives

def cpio_newc(tree: Path, cpio: Path) -> bytes:
    """``tree`` as an uncompressed newc cpio archive, every file owned by root."""
    names = sorted(str(path.relative_to(tree)) for path in tree.rglob("*"))
    result = subprocess.run([str(cpio), "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=tree,
                            input="\n".join(names).encode() + b"\n", capture_output=True)
    if result.returncode != 0:
        raise HostRunnerError(f"cpio failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def cpio_gz(tree: Path, cpio: Path) -> bytes:
    """``tree`` as a gzip-compressed newc cpio archive, every file owned by root."""
    return gzip.compress(cpio_newc(tree, cpio), compresslevel=6)


def base_archive(tree: Path, busybox: Path, order: Sequence[str], images: Mapping[str, bytes],
                 cpio: Path, init: str | None = None, compress: bool = True) -> bytes:
    """The cached part, built in the empty directory ``tree``: busybox, the modules and their load order.

    ``init``: a ``/init`` to include (a host whose ``/init`` is the same on every run);
    ``compress=False`` for a guest where decompressing costs more than loading.
    """
    for directory in ("bin", "dev", "proc", "sys", "lib/modules"):
        (tree / directory).mkdir(parents=True)
    shutil.copy(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    for name in order:
        (tree / "lib" / "modules" / f"{name}.ko").write_bytes(images[name])
    (tree / "lib" / "modules" / "load-order").write_text("\n".join(order) + "\n")
    if init is not None:
        (tree / "init").write_text(init)
        (tree / "init").chmod(0o755)
    return cpio_gz(tree, cpio) if compress else cpio_newc(tree, cpio)


def run_initrd(base: Path, init: str, script: str, directory: Path, cpio: Path) -> Path:
    """The cached archive ``base`` with this run's ``/init`` and ``/command.sh`` appended, in ``directory``."""
    tree = directory / "run"
    tree.mkdir()
    (tree / "init").write_text(init)
    (tree / "init").chmod(0o755)
    (tree / "command.sh").write_text(script)
    initrd = directory / "initrd.cpio.gz"
    initrd.write_bytes(base.read_bytes() + cpio_gz(tree, cpio))
    return initrd
