"""``import pykvm`` loads only its start-up guard; each public name is imported on its first use (PEP 562)."""

from __future__ import annotations

import ast
import site
import subprocess
import sys
from pathlib import Path

import pytest

import pykvm
from pykvm.vmm import testkernels


def modules_after(code: str) -> list[str]:
    """The pykvm modules (and the binding's cffi backend) a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m for m in sys.modules if m.startswith(('pykvm', '_cffi')))))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.split()


@pytest.mark.host_independent
def test_import_pykvm_loads_no_layer():
    assert modules_after("import pykvm") == ["pykvm", "pykvm.startup"]


@pytest.mark.host_independent
def test_a_name_is_imported_on_first_use_with_only_what_it_needs():
    # The control for the test above: the same interpreter with one name used holds its module, and the binding.
    loaded = modules_after("import pykvm\npykvm.Kvm")
    assert {"pykvm.core.system", "pykvm._binding", "_cffi_backend"} <= set(loaded)
    assert "pykvm.guests" not in loaded and "pykvm.hosts" not in loaded


@pytest.mark.host_independent
def test_every_exported_name_resolves_and_unknown_names_are_attribute_errors():
    for name in pykvm.__all__:
        assert getattr(pykvm, name) is not None, name
    assert pykvm.detect_host is pykvm.hosts.detect
    assert pykvm.vmm.Machine is not None                     # any submodule, listed or not
    with pytest.raises(AttributeError, match="module 'pykvm' has no attribute 'nope'"):
        pykvm.nope
    assert set(pykvm.__all__) <= set(dir(pykvm))


@pytest.mark.host_independent
def test_type_checkers_see_the_same_names_as_all():
    # The TYPE_CHECKING block (eager imports, for mypy and IDEs) must list exactly what __getattr__ serves.
    tree = ast.parse(Path(pykvm.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                 "TYPE_CHECKING")
    imported = {alias.asname or alias.name for node in block.body if isinstance(node, ast.ImportFrom)
                and node.level == 1 for alias in node.names}                  # pykvm's own, not typing's
    assert imported == set(pykvm.__all__)


@pytest.mark.host_independent
def test_the_core_leaves_an_entry_failure_unexplained_and_the_hosts_explainer_explains_it():
    # The core never imports pykvm.hosts, nor keeps explainers: a guest session or the VMM is handed
    # pykvm.hosts.explain_exit by the tool that makes it, and calls it on such an exit.
    code = ("import sys\nfrom pykvm.core import exits\nfailed = exits.FailEntryExit(0x80000021, 0)\n"
            "before = ('pykvm.hosts' in sys.modules, failed.explanation)\n"
            "from pykvm.hosts import explain_exit\nexplain_exit(None, failed)\n"
            "print(before[0], repr(before[1]), repr(failed.explanation))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    imported, unexplained, explanation = done.stdout.split(" ", 2)
    assert (imported, unexplained) == ("False", "''")
    assert "0x80000021" in explanation and "hardware reason" in explanation, explanation


# What `python -m pykvm.boot` needs before its first serial byte leaves out (each imported where it is used):
# the x86 layer (pm1's S3 wake), the statistics fds and userfaultfd (vcpu/vm.stats, memory.provide_pages),
# difflib (a misspelt name's suggestions), ctypes.util with the subprocess and tempfile it imports (the
# flush-page port's mprotect), the optional devices edu and intel-iommu (Machine(devices=...)), and
# pathlib (the `pykvm --help` listing's; the host's CPU brand is read with open()).
NOT_FOR_THE_FIRST_BYTE = ("pykvm.x86", "pykvm.core.stats", "pykvm.core.userfault", "difflib", "ctypes.util",
                          "subprocess", "pykvm.vmm.edu", "pykvm.vmm.vtd", "pathlib")


def loaded(code: str, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a fresh interpreter holds after running ``code``.

    The interpreter runs without ``site`` (-S), given pykvm's and the site-packages' folders: what pykvm
    imports, not what an editable install's import hook loads at start-up (pathlib).
    """
    path = [str(Path(pykvm.__file__).parent.parent), *site.getsitepackages()]
    probe = (f"import sys\nsys.path[:0] = {path!r}\n{code}\n"
             f"print(' '.join(name for name in {names!r} if name in sys.modules))")
    done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=60,
                          check=True)
    return done.stdout.split()


@pytest.mark.host_independent
def test_the_boot_command_imports_nothing_its_first_byte_does_not_need():
    assert loaded("import pykvm.boot", NOT_FOR_THE_FIRST_BYTE) == []


def test_the_deferred_imports_happen_where_they_are_used(kvm):
    # The control: the same probe sees each of them once the code that needs it has run (a real vCPU's
    # statistics and S3 wake, a misspelt name's suggestions, the flush page's libc, a q35 machine with
    # edu behind the IOMMU, the command's listing of the tools).
    code = ("import pykvm.boot\nfrom pykvm.core import memory, stats\nfrom pykvm.core.system import Kvm\n"
            "from pykvm.vmm import cpu_model, pm1, testdev\nfrom pykvm.vmm.machine import Machine\n"
            "from pykvm.command import summary\n"
            "with Kvm() as kvm, kvm.create_vm() as vm:\n    vcpu = vm.create_vcpu()\n    vcpu.stats\n"
            "    pm1.resume_cpus([vcpu], 0x1000)\n"
            "    vm.memory.provide_pages(vm.memory.add_slot(1 << 30, 4096).slot, lambda gpa: bytes(4096))\n"
            "stats._close_matches('exit', ['exits'])\ncpu_model._suggest('sse4-3', ['sse4.2'])\ntestdev._libc()\n"
            f"Machine({str(testkernels.path('hello'))!r}, chipset='q35', devices=['intel-iommu', 'edu'])\n"
            "summary('boot')")
    assert loaded(code, NOT_FOR_THE_FIRST_BYTE) == list(NOT_FOR_THE_FIRST_BYTE)
