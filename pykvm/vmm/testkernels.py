"""pykvm's test kernels: small 32-bit Multiboot ELF images assembled from ``guests/kernels/*.S``.

Why this exists: ``python -m pykvm.boot`` and its tests need kernels that each
do one thing (print a line, read fw_cfg, start the APs, ...) and report through
the serial port and the debug-exit port. ``setup.py`` builds them at install
time into ``pykvm/vmm/kernels/`` (loading this file alone: it imports nothing
from pykvm); :func:`path` finds one, and rebuilds it there if its source is
newer (a source tree edited since the install).

Each kernel is assembled and linked as x86-64 (its 64-bit parts need 64-bit
relocations), then converted to ELF32, as Multiboot v1 wants; linked at 1 MiB.
``hello`` is also built as a flat binary with the Multiboot header's address
fields (the "a.out kludge"), ``hello-aout.bin``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "kernels"
# Sources: next to the package in a source tree (editable install), else shipped in OUT_DIR.
SOURCE_DIRS = (HERE.parent.parent / "guests" / "kernels", OUT_DIR)
KERNELS = ("hello", "exitcode", "fwcfg", "longmode", "smp", "pit", "ioapic")
AOUT_KERNELS = ("hello",)
LOAD_ADDRESS = 0x100000
LINKER_SCRIPT = f"""
ENTRY(_start)
SECTIONS {{
  . = {LOAD_ADDRESS:#x};
  __image_start = .;
  .text : {{ *(.multiboot) *(.text*) }}
  .rodata : {{ *(.rodata*) }}
  .data : {{ *(.data*) }}
  __load_end = .;
  .bss : {{ *(.bss*) *(COMMON) }}
  __bss_end = .;
  /DISCARD/ : {{ *(.note*) *(.comment*) *(.eh_frame*) }}
}}
"""


class KernelBuildError(RuntimeError):
    """binutils failed on a test kernel; the message holds its output."""


def source_dir() -> Path:
    for directory in SOURCE_DIRS:
        if (directory / "kernel.inc").is_file():
            return directory
    raise KernelBuildError(f"no test kernel sources (kernel.inc) in {' or '.join(map(str, SOURCE_DIRS))}")


def _run(argv: list[str]) -> None:
    tool = shutil.which(argv[0])
    if tool is None:
        raise KernelBuildError(f"`{argv[0]}` not found on PATH: install binutils")
    result = subprocess.run([tool, *argv[1:]], capture_output=True, text=True)
    if result.returncode:
        raise KernelBuildError(f"{argv[0]} failed (exit {result.returncode}):\n"
                               f"{result.stderr.strip() or result.stdout.strip()}")


def build(name: str, out_dir: Path = OUT_DIR, sources: Path | None = None) -> list[Path]:
    """Assemble and link ``name``.S into ``out_dir``/``name``.elf (and the a.out variant); the paths."""
    sources = sources or source_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    built = []
    variants: list[tuple[str, list[str]]] = [(f"{name}.elf", [])]
    if name in AOUT_KERNELS:
        variants.append((f"{name}-aout.bin", ["--defsym", "AOUT=1"]))
    with tempfile.TemporaryDirectory(prefix="pykvm-kernel-") as tmp:
        script = Path(tmp, "kernel.ld")
        script.write_text(LINKER_SCRIPT)
        for filename, defines in variants:
            obj, elf = Path(tmp, "kernel.o"), Path(tmp, "kernel.elf")
            _run(["as", "--64", "-I", str(sources), *defines, "-o", str(obj), str(sources / f"{name}.S")])
            _run(["ld", "-m", "elf_x86_64", "-static", "-nostdlib", "-n", "-T", str(script), "-o", str(elf),
                  str(obj)])
            target = out_dir / filename
            if filename.endswith(".bin"):
                _run(["objcopy", "-O", "binary", "--set-section-flags", ".bss=alloc", "-R", ".bss",
                      str(elf), str(target)])
            else:
                _run(["objcopy", "-O", "elf32-i386", "--strip-all", str(elf), str(target)])
            built.append(target)
    return built


def build_all(out_dir: Path = OUT_DIR, sources: Path | None = None) -> list[Path]:
    """Build every test kernel into ``out_dir``, and copy their sources there."""
    sources = sources or source_dir()
    built = []
    for name in KERNELS:
        built += build(name, out_dir, sources)
    if sources.resolve() != out_dir.resolve():
        for source in sources.iterdir():
            if source.suffix in (".S", ".inc"):
                shutil.copyfile(source, out_dir / source.name)
    return built


def path(name: str) -> Path:
    """The built kernel ``name`` (``"hello"``, or ``"hello-aout.bin"``), rebuilt if its source is newer."""
    base = name.split("-")[0].removesuffix(".elf").removesuffix(".bin")
    if base not in KERNELS:
        raise KeyError(f"no test kernel {name!r}; kernels: {', '.join(KERNELS)}")
    filename = name if name.endswith((".elf", ".bin")) else f"{name}.elf"
    target = OUT_DIR / filename
    sources = source_dir()
    newest = max(os.stat(sources / f"{base}.S").st_mtime, os.stat(sources / "kernel.inc").st_mtime)
    if not target.is_file() or target.stat().st_mtime < newest:
        build(base, OUT_DIR, sources)
    return target
