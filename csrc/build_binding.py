"""cffi build script for ``pykvm._binding`` (API mode, out-of-line).

Why this exists: struct layouts and ioctl numbers must come from the system's
own ``<linux/kvm.h>``, so the binding is compiled at install time (setup.py
names this file in ``cffi_modules``). Declarations live in ``kvm_cdef.h``, the
C helpers in ``pykvm_helpers.h``; the Python API in ``pykvm/`` only imports the
compiled module.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "kvm_cdef.h").read_text())
ffibuilder.set_source(
    "pykvm._binding",
    (HERE / "pykvm_helpers.h").read_text(),
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"), verbose=True)
