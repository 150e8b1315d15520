"""The bochs-intel guest's disks: the cached ext4 image holding what the command needs, and the
per-run command disk.

Why this exists: Bochs has no 9p, so the guest cannot mount this machine's
``/`` as tcg-amd's does. The command runs instead on an ext4 image that holds,
at the same absolute paths as here: the working directory, the virtualenv the
runner runs in, pykvm's source tree, the base Python the virtualenv points at
(its standard library without tests, IDLE, tkinter and the like), binutils'
``as``, ``ld``, ``objcopy`` and ``nm`` (pykvm assembles guest code at run
time), the shared libraries every ELF file among them needs (from ``ldd``),
a static busybox as ``/bin/sh``, and ``/etc/passwd`` and ``/etc/group``.
The trees' ``__pycache__`` files are copied and whatever byte-code is missing
or stale is compiled into the image (the guest runs with
``PYTHONDONTWRITEBYTECODE=1``, and compiling under emulation is slow).

The image is cached under a key of its manifest: every path, and each file's
size, plus its modification time for the trees the caller edits (working
directory, virtualenv, pykvm). The base Python, its libraries and binutils
count by the Python version and their file list and sizes only, and no
``__pycache__`` file counts, so byte-code that Python rewrites here does not
rebuild the image.

The command disk is one Bochs cylinder (504 KiB): a magic line, the run's
marker nonce, kvm_intel's module parameters and the command script. ``/init``
finds it by its magic, so the ISO and the ext4 image are the same on every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .cache import write_atomically
from .console import Markers, tail_lines
from .errors import HostRunnerError
from .tools import run

COMMAND_DISK_MAGIC = "PYKVM-BOCHS-COMMAND-DISK-1"
# Bochs derives a flat disk's geometry from its size when it is whole cylinders of 16 x 63 sectors.
CYLINDER_BYTES = 16 * 63 * 512
# Top-level parts of the base Python's lib/pythonX.Y left off the image.
STDLIB_EXCLUDES = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                   "site-packages", "config-", "pydoc_data", "__phello__")
# Left off the copied trees at any depth.
TREE_EXCLUDES = (".git", ".pytest_cache", ".mypy_cache", ".ruff_cache")
BINUTILS = ("as", "ld", "objcopy", "nm")
LAYOUT = "bochs-intel disk: same paths, compiled byte-code, busybox sh, binutils, v2"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One item of the image: a file copied from ``source``, a symlink to ``target``, or a directory."""

    path: str                      # absolute path inside the image (and here)
    kind: str                      # "file" | "symlink" | "dir"
    source: str = ""               # the file copied, for "file"
    target: str = ""               # the link's text, for "symlink"


# ---------------------------------------------------------------- pure decisions

def parse_ldd(output: str) -> list[str]:
    """Absolute library paths in ``ldd`` output (``x => /path (addr)`` and ``/path (addr)`` lines)."""
    found = []
    for line in output.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)", line)
        if match:
            found.append(match.group(1))
    return found


def excluded(name: str, excludes: Sequence[str]) -> bool:
    """True when the path component ``name`` is one of ``excludes`` (``x-`` excludes every ``x-*``)."""
    return any(name == item or (item.endswith("-") and name.startswith(item)) for item in excludes)


def manifest_key(entries: Iterable[Entry], sizes: Mapping[str, int], mtimes: Mapping[str, int],
                 python_version: str) -> str:
    """Cache key of an image: the layout, the Python version, every entry and its file's size, and
    the modification time of the files in ``mtimes`` (the trees the caller edits)."""
    digest = hashlib.sha256(f"{LAYOUT}\n{python_version}\n".encode())
    for entry in sorted(entries, key=lambda e: e.path):
        digest.update(repr((entry, sizes.get(entry.source), mtimes.get(entry.source))).encode())
    return digest.hexdigest()[:16]


def disk_bytes(content_bytes: int, files: int) -> int:
    """Size of the ext4 image for ``content_bytes`` in ``files`` files (and byte-code for them):
    room for metadata, rounded up to whole Bochs cylinders."""
    size = int(content_bytes * 1.2) + files * 4096 + 64 * 2**20
    return -(-size // CYLINDER_BYTES) * CYLINDER_BYTES


def command_disk(markers: Markers, script: str, kvm_intel_parameters: str) -> bytes:
    """The per-run disk: magic line, nonce, kvm_intel's parameters, the script; one cylinder, NUL-padded."""
    if "\n" in kvm_intel_parameters or "\0" in kvm_intel_parameters:
        raise ValueError("kvm_intel's module parameters must be one line")
    data = f"{COMMAND_DISK_MAGIC}\n{markers.nonce}\n{kvm_intel_parameters}\n{script}".encode()
    if b"\0" in data or len(data) > CYLINDER_BYTES:
        raise ValueError(f"the command script holds a NUL byte or exceeds {CYLINDER_BYTES >> 10} KiB")
    return data.ljust(CYLINDER_BYTES, b"\0")


# ---------------------------------------------------------------- the manifest (reads the file system)

def _add_path(path: str, entries: dict[str, Entry]) -> str:
    """Add ``path`` with every symlink on the way to it (``/lib64 -> usr/lib64``); return its real path."""
    parts = Path(path).parts
    current = Path("/")
    for index, part in enumerate(parts[1:], 1):
        candidate = current / part
        if candidate.is_symlink():
            target = os.readlink(candidate)
            entries.setdefault(str(candidate), Entry(str(candidate), "symlink", target=target))
            resolved = Path(os.path.normpath(current / target))
            return _add_path(str(resolved.joinpath(*parts[index + 1:])), entries)
        current = candidate
    kind = "dir" if Path(path).is_dir() else "file"
    entries.setdefault(path, Entry(path, kind, source=path if kind == "file" else ""))
    return path


def _add_tree(root: Path, excludes: Sequence[str], entries: dict[str, Entry], bytecode: dict[str, Entry],
              top_excludes: Sequence[str] = ()) -> list[str]:
    """Add the tree ``root`` (without ``excludes`` at any depth, ``top_excludes`` at its top) to
    ``entries``, its ``__pycache__`` files to ``bytecode``; return its files."""
    real_root = _add_path(str(root), entries)
    files = []
    for directory, dirnames, filenames in os.walk(real_root):
        if os.path.basename(directory) == "__pycache__":
            bytecode.update((path, Entry(path, "file", source=path)) for path in
                            (os.path.join(directory, name) for name in filenames if name.endswith(".pyc")))
            continue
        top = directory == real_root
        dirnames[:] = [d for d in dirnames
                       if not excluded(d, excludes) and not (top and excluded(d, top_excludes))]
        for name in dirnames + filenames:
            if excluded(name, excludes) or (top and excluded(name, top_excludes)) or name == "__pycache__":
                continue
            path = os.path.join(directory, name)
            if os.path.islink(path):
                entries[path] = Entry(path, "symlink", target=os.readlink(path))
            elif os.path.isdir(path):
                entries[path] = Entry(path, "dir")
            elif os.path.isfile(path):
                entries[path] = Entry(path, "file", source=path)
                files.append(path)
    return files


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"\x7fELF"
    except OSError:
        return False


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What goes on the image, and which files count by their modification time in its key.

    ``bytecode``: the trees' ``__pycache__`` files, copied but not in the key (a stale
    one is recompiled when the image is built, or by Python at run time).
    """

    entries: list[Entry]
    bytecode: list[Entry]
    edited: frozenset[str]
    python_version: str
    compile_roots: tuple[str, ...]


def _libraries(elves: Sequence[str], ldd_cache: Path | None) -> list[str]:
    """The shared libraries ``elves`` need, from ``ldd`` (2-3 s), or from ``ldd_cache`` when it
    holds the answer for the same files (paths, sizes, modification times)."""
    key = hashlib.sha256(repr([(path, os.stat(path).st_size, os.stat(path).st_mtime_ns)
                               for path in sorted(elves)]).encode()).hexdigest()
    if ldd_cache is not None:
        try:
            cached = json.loads(ldd_cache.read_text())
            if cached.get("key") == key:
                return list(cached["libraries"])
        except (OSError, ValueError, AttributeError):
            pass
    libraries: set[str] = set()
    for chunk in range(0, len(elves), 200):
        libraries.update(parse_ldd(run(["ldd", *elves[chunk:chunk + 200]]).stdout))
    if ldd_cache is not None:
        write_atomically(ldd_cache, json.dumps({"key": key, "libraries": sorted(libraries)}).encode())
    return sorted(libraries)


def manifest(workdir: Path, busybox: Path, extra_trees: Sequence[Path] = (), ldd_cache: Path | None = None
             ) -> Manifest:
    """The image of ``workdir``, the running virtualenv, ``extra_trees`` (pykvm's source) and the base
    Python, with binutils, the libraries of every ELF file among them, and ``busybox`` as ``/bin/sh``.
    ``ldd_cache`` keeps ``ldd``'s answer between runs."""
    entries: dict[str, Entry] = {}
    bytecode: dict[str, Entry] = {}
    for name in ("bin", "sbin", "lib", "lib64"):                     # merged-/usr symlinks
        if os.path.islink(f"/{name}"):
            entries[f"/{name}"] = Entry(f"/{name}", "symlink", target=os.readlink(f"/{name}"))
    edited: list[str] = []
    trees = [workdir, *extra_trees]
    if sys.prefix != sys.base_prefix:                                # the virtualenv
        trees.append(Path(sys.prefix))
    roots: list[str] = []
    for tree in trees:
        real = str(Path(tree).resolve())
        if any(real == root or real.startswith(root + "/") for root in roots):
            continue
        edited += _add_tree(Path(tree), TREE_EXCLUDES, entries, bytecode)
        roots.append(real)
    base = Path(sys.base_prefix)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for path in sorted((base / "bin").glob(f"python{sys.version_info.major}*")):
        if not path.name.endswith(("-config", ".py")):
            _add_path(str(path), entries)
    for path in sorted((base / "lib").glob(f"libpython{version}*.so*")):
        _add_path(str(path), entries)
    stdlib = base / "lib" / f"python{version}"
    if stdlib.is_dir():
        _add_tree(stdlib, TREE_EXCLUDES, entries, bytecode, STDLIB_EXCLUDES)
        roots.append(str(stdlib.resolve()))
    for tool in BINUTILS:
        found = shutil.which(tool)
        if found:
            _add_path(found, entries)
    sh_dir = "/usr/bin" if os.path.islink("/bin") else "/bin"
    entries[f"{sh_dir}/busybox"] = Entry(f"{sh_dir}/busybox", "file", source=str(busybox))
    entries[f"{sh_dir}/sh"] = Entry(f"{sh_dir}/sh", "symlink", target="busybox")
    for name in ("/etc/passwd", "/etc/group"):
        entries[name] = Entry(name, "file", source=name)
    for name in ("/proc", "/sys", "/dev", "/tmp", "/run", "/root"):
        entries.setdefault(name, Entry(name, "dir"))
    elves = [e.source for e in entries.values()
             if e.kind == "file" and (".so" in e.source or os.access(e.source, os.X_OK)) and _is_elf(e.source)]
    for library in _libraries(elves, ldd_cache):
        _add_path(library, entries)
    return Manifest(sorted(entries.values(), key=lambda e: e.path), sorted(bytecode.values(), key=lambda e: e.path),
                    frozenset(edited),
                    f"{sys.implementation.name} {sys.version.split()[0]}", tuple(roots))


def image_key(found: Manifest) -> str:
    """The cache key of ``found``'s image (reads each file's size and, for edited ones, its mtime)."""
    stats = {e.source: os.stat(e.source) for e in found.entries if e.kind == "file"}
    return manifest_key(found.entries, {path: st.st_size for path, st in stats.items()},
                        {path: st.st_mtime_ns for path, st in stats.items() if path in found.edited},
                        found.python_version)


# ---------------------------------------------------------------- building it

def build_image(found: Manifest, output: Path, mkfs: Path) -> None:
    """Build the ext4 image of ``found`` at ``output``: stage the files, compile their byte-code, mkfs."""
    with tempfile.TemporaryDirectory(prefix="pykvm-bochs-disk-", dir=output.parent) as staging_name:
        staging = Path(staging_name) / "root"
        staging.mkdir()
        total = 0
        for entry in [*found.entries, *found.bytecode]:
            target = staging / entry.path.lstrip("/")
            if entry.kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.kind == "symlink":
                if not target.is_symlink():
                    target.symlink_to(entry.target)
            else:
                shutil.copy2(entry.source, target)
                total += target.stat().st_size
        # Byte-code missing or stale in the copied __pycache__ directories; -s/-p: it names the
        # paths the guest sees, which are this machine's.
        run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(staging), "-p", "/",
             *(str(staging / root.lstrip("/")) for root in found.compile_roots)])
        temporary = output.with_name(f".{output.name}.{os.getpid()}")
        result = run([str(mkfs), "-q", "-F", "-L", "pykvm", "-O", "^has_journal", "-E", "root_owner=0:0",
                      "-d", str(staging), str(temporary), f"{disk_bytes(total, len(found.entries)) // 1024}k"])
        if result.returncode != 0:
            temporary.unlink(missing_ok=True)
            raise HostRunnerError(f"mkfs.ext4 -d failed:\n{tail_lines(result.stdout, 10)}")
        os.replace(temporary, output)
