"""Assemble GNU-assembler text into a flat guest image, with its symbols.

Why this exists: tests and labs need small custom guests ("sti; nop; out") and
the expected RIPs of their labels. This wraps binutils (``as``, ``ld``,
``objcopy``, ``nm``), which every C toolchain ships, so no NASM is needed. The
same function builds the packaged guest images at install time (setup.py loads
this module without the compiled binding, so it imports nothing but errors).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..core import checks
from ..core.errors import AssemblerError, InvalidArgument, UnknownLabel


class Mode(str, enum.Enum):
    """CPU mode a piece of guest code is assembled for."""

    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"


def mode_of(mode: Mode | str, name: str = "mode") -> Mode:
    """``mode`` as a :class:`Mode`, else :class:`InvalidArgument` naming the three choices."""
    try:
        return Mode(mode)
    except ValueError:
        raise InvalidArgument(f"{name}={checks.shown(mode)}: not a CPU mode pykvm runs guests in; choose one "
                              f"of {', '.join(m.value for m in Mode)}") from None


ADDRESS_BITS = {Mode.REAL: 16, Mode.PROTECTED: 32, Mode.LONG: 64}   # the width of IP / EIP / RIP
_SYMBOL = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$]*")      # a name `as --defsym` takes as one symbol


_AS_FLAGS = {Mode.REAL: ["--32"], Mode.PROTECTED: ["--32"], Mode.LONG: ["--64"]}
_LD_EMULATION = {Mode.REAL: "elf_i386", Mode.PROTECTED: "elf_i386", Mode.LONG: "elf_x86_64"}
_PROLOGUE = {Mode.REAL: ".code16; ", Mode.PROTECTED: ".code32; ", Mode.LONG: ".code64; "}

# One contiguous image: code, read-only data, data and bss in that order.
_LINKER_SCRIPT = """
SECTIONS {
  . = ORIGIN;
  .image : { *(.text*) *(.rodata*) *(.data*) *(.bss*) *(COMMON) }
  /DISCARD/ : { *(.note*) *(.comment*) *(.eh_frame*) }
}
"""


@dataclasses.dataclass(frozen=True)
class Assembled:
    """Flat machine code to load at ``origin``, and its label addresses.

    For real mode, ``origin`` and the symbols are offsets within the code
    segment (what IP holds); otherwise they are linear addresses (what RIP holds).
    """

    code: bytes
    symbols: dict[str, int]
    origin: int
    mode: Mode

    def __bytes__(self) -> bytes:
        return self.code

    def __len__(self) -> int:
        return len(self.code)

    def address(self, symbol: str) -> int:
        """Address of ``symbol``; :class:`UnknownLabel` (a KeyError) names the labels that exist."""
        return label_address(self.symbols, symbol, "this code")


def label_address(symbols: dict[str, int], symbol: str, where: str) -> int:
    """``symbols[symbol]``, else :class:`UnknownLabel` naming ``where`` and the labels there (a few, if many)."""
    try:
        return symbols[symbol]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(symbol, list(symbols), n=6) if isinstance(symbol, str) else []
        known = close or sorted(symbols)
        raise UnknownLabel(f"symbol={checks.shown(symbol)}: no such label in {where}; "
                           f"{'similar' if close else 'labels'}: {checks.shown(known)}") from None


def _check_defines(defines: dict[str, int]) -> None:
    checks.instance("defines", defines, dict, "a dict {symbol name: integer}")
    for name, value in defines.items():
        if not isinstance(name, str) or not _SYMBOL.fullmatch(name):
            raise InvalidArgument(f"defines: name {checks.shown(name)} is not one assembler symbol; use "
                                  f"letters, digits, '_', '.' and '$', not starting with a digit")
        checks.integer(f"defines[{name!r}]", value, -(1 << 63), (1 << 64) - 1,
                       "as --defsym NAME=VALUE takes a number; text would be pasted into the source")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssemblerError(f"`{name}` not found on PATH: install binutils "
                             f"(Debian/Ubuntu: apt-get install binutils)")
    return path


def _run(argv: list[str], what: str, workdir: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())
        output = output.replace(str(Path(workdir, "guest.S")), "<source>")
        raise AssemblerError(f"{what} failed (exit {result.returncode}):\n{output}")
    return result.stdout


def assemble(source: str, mode: Mode | str = Mode.LONG, origin: int = 0,
             defines: dict[str, int] | None = None,
             include_dirs: Sequence[str | os.PathLike[str]] = ()) -> Assembled:
    """Assemble ``source`` for ``mode`` and link it to run at ``origin``.

    ``defines`` become ``--defsym NAME=VALUE``; ``include_dirs`` are searched
    by ``.include``. Errors from ``as``/``ld`` raise :class:`AssemblerError`
    with their messages (line numbers refer to ``source``, after a one-line
    ``.codeNN`` prologue that is accounted for).
    """
    checks.instance("source", source, str, "GNU-assembler text")
    mode = mode_of(mode)
    bits = ADDRESS_BITS[mode]
    checks.unsigned("origin", origin, bits, f"the address the code runs at is {bits}-bit in {mode.value} mode"
                    f"{' (an IP offset in the code segment)' if mode == Mode.REAL else ''}")
    _check_defines(defines or {})
    with tempfile.TemporaryDirectory(prefix="pykvm-asm-") as tmp:
        src = Path(tmp, "guest.S")
        # The prologue shares line 1 with the source, so messages keep its line numbers.
        src.write_text(_PROLOGUE[mode] + source + "\n")
        script = Path(tmp, "guest.ld")
        script.write_text(_LINKER_SCRIPT.replace("ORIGIN", hex(origin)))
        obj, elf, flat = (Path(tmp, n) for n in ("guest.o", "guest.elf", "guest.bin"))
        argv = [_tool("as"), *_AS_FLAGS[mode], "-o", str(obj)]
        for name, value in (defines or {}).items():
            argv += ["--defsym", f"{name}={value}"]
        for directory in include_dirs:
            argv += ["-I", str(directory)]
        _run(argv + [str(src)], "as", tmp)
        _run([_tool("ld"), "-m", _LD_EMULATION[mode], "-static", "-nostdlib",
              "-T", str(script), "-o", str(elf), str(obj)], "ld", tmp)
        _run([_tool("objcopy"), "-O", "binary", "-j", ".image", str(elf), str(flat)],
             "objcopy", tmp)
        symbols = _symbols(_run([_tool("nm"), "--defined-only", str(elf)], "nm", tmp),
                           defines or {})
        return Assembled(flat.read_bytes(), symbols, origin, mode)


def assemble_file(path: str | os.PathLike, mode: Mode | str, origin: int,
                  defines: dict[str, int] | None = None) -> Assembled:
    """Assemble a source file; ``.include`` is searched in its directory."""
    path = Path(path)
    return assemble(path.read_text(), mode, origin, defines, [path.parent])


def _symbols(nm_output: str, defines: dict[str, int]) -> dict[str, int]:
    symbols = {}
    for line in nm_output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "tTdDbB" and parts[2] not in defines:
            symbols[parts[2]] = int(parts[0], 16)
    return symbols

