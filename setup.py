"""Build and install pykvm.

Two things are compiled at install time, both against what is on this machine:
- ``pykvm._binding``: the cffi module (API mode) built from ``csrc/`` against
  the system's ``<linux/kvm.h>``;
- the guest images: ``guests/*.S`` assembled with binutils into flat binaries
  plus a JSON symbol table, shipped with their sources in ``pykvm/guests/images``;
- the Multiboot test kernels of ``python -m pykvm.boot``: ``guests/kernels/*.S``
  into ELF32 images in ``pykvm/vmm/kernels``.

An editable install (``pip install -e``, as the README's commands do) also
byte-compiles the package in place, as pip does for an ordinary install: every
``python -m pykvm...`` process (a lab check starts two) would otherwise compile
the modules it imports, each time, where ``PYTHONDONTWRITEBYTECODE`` is set.
"""

import compileall
import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
GUEST_MODES = ("real", "protected", "long")
PACKAGES_BELOW = ("core", "x86", "irqchip", "runtime", "guests", "hosts")


def _load_build_modules():
    """pykvm.x86.asm and pykvm.guests.layout, imported without running any package __init__.

    The binding does not exist yet; these modules and what they import are binding-free.
    """
    saved = {name: sys.modules.pop(name) for name in list(sys.modules)
             if name == "pykvm" or name.startswith("pykvm.")}
    for name in ("pykvm",) + tuple(f"pykvm.{sub}" for sub in PACKAGES_BELOW):
        package = types.ModuleType(name)
        package.__path__ = [str(HERE.joinpath(*name.split(".")))]
        sys.modules[name] = package
    try:
        return (importlib.import_module("pykvm.x86.asm"),
                importlib.import_module("pykvm.guests.layout"))
    finally:
        for name in [n for n in sys.modules if n == "pykvm" or n.startswith("pykvm.")]:
            del sys.modules[name]
        sys.modules.update(saved)


class BuildExtAndGuests(build_ext):
    """build_ext that also assembles the guest images next to the package."""

    def run(self):
        super().run()
        package_dir = HERE / "pykvm" if self.inplace else Path(self.build_lib) / "pykvm"
        self.build_guests(package_dir / "guests" / "images")
        self.build_kernels(package_dir / "vmm" / "kernels")
        if self.inplace:
            compileall.compile_dir(package_dir, quiet=1)

    def build_guests(self, out_dir: Path) -> None:
        asm, layout = _load_build_modules()
        out_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted((HERE / "guests").iterdir()):
            if source.suffix in (".S", ".inc"):
                shutil.copyfile(source, out_dir / source.name)
        for mode in GUEST_MODES:
            origin = 0 if mode == "real" else layout.CODE
            image = asm.assemble_file(HERE / "guests" / f"{mode}.S", mode, origin,
                                      layout.asm_defines())
            (out_dir / f"{mode}.bin").write_bytes(image.code)
            (out_dir / f"{mode}.json").write_text(json.dumps(
                {"mode": mode, "origin": origin, "symbols": image.symbols}, indent=1,
                sort_keys=True))
            print(f"pykvm: assembled guests/{mode}.S -> {len(image.code)} bytes")

    def build_kernels(self, out_dir: Path) -> None:
        """The Multiboot test kernels of ``python -m pykvm.boot`` (pykvm/vmm/testkernels.py, stdlib only)."""
        spec = importlib.util.spec_from_file_location("_pykvm_testkernels", HERE / "pykvm" / "vmm" / "testkernels.py")
        testkernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(testkernels)
        built = testkernels.build_all(out_dir, HERE / "guests" / "kernels")
        print(f"pykvm: assembled guests/kernels -> {', '.join(path.name for path in built)}")


# `pykvm demo --plot FILE.svg` (pykvm.hosts.latency_plot); the tests draw one, so they install it too.
PLOT = ["matplotlib>=3.6"]

setup(
    name="pykvm",
    version="0.1.0",
    description="Drive Linux KVM from Python: VMs, vCPUs, tiny guests, interrupt injection",
    packages=find_packages(include=["pykvm", "pykvm.*"]),
    # The package sits at the top of the clone: saying so makes `pip install -e` put the clone on sys.path
    # with a .pth line instead of installing setuptools' import hook, which imports pathlib, importlib.util
    # and urllib.parse in every Python process of the environment (26.5 -> 12 ms for `python -c pass`).
    package_dir={"": "."},
    package_data={"pykvm.labs": ["*/sheet.md", "*/starter.py"]},
    entry_points={"pytest11": ["pykvm = pykvm.testing.plugin"],
                  "console_scripts": ["pykvm = pykvm.command:main"]},
    python_requires=">=3.10",
    setup_requires=["cffi>=1.15"],
    install_requires=["cffi>=1.15", "ioctl-opt>=1.2"],
    extras_require={"test": ["pytest>=7", "psutil>=5.9", "pytest-xdist>=3.5"],
                    "plot": PLOT,
                    "lint": ["ruff>=0.5", "mypy>=1.10", "vermin>=1.6"],
                    # The site under docs/ (docs/about.md says why Sphinx); Sphinx 9 needs Python >= 3.11.
                    # pytest: autodoc imports pykvm.testing (the plugin) to document it.
                    "docs": ["sphinx>=7.2", "myst-parser>=2", "pytest>=7"]},
    cffi_modules=["csrc/build_binding.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtAndGuests},
    zip_safe=False,
)
