"""The pure parts of ``python -m pykvm.hosts``: no QEMU, no apt, no kernel needed.

The runner's decisions live in pure functions (kernel choice, module load
order, the guest's ``/init`` and command scripts, the QEMU command line, the
console filter); these tests pin them. The command script and ``/init`` are
also checked by this machine's own ``sh``.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import subprocess
import sys

import pytest

from pykvm.core.errors import PyKvmError
from pykvm.hosts.runner import cli, elf, errors, initramfs, kernel, qemu, tcg_amd, tools
from pykvm.hosts.runner.console import ConsoleFilter, Markers

APT_CACHE_SEARCH = """\
linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-56-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-56-amd64-dbg - Debug symbols for linux-image-6.1.0-56-amd64
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.117+deb12-rt-amd64 - Linux 6.12 for 64-bit PCs (signed), PREEMPT_RT
linux-image-6.12.99+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12-amd64 - Linux for 64-bit PCs (meta-package)
linux-image-6.12-amd64-signed-template - Template for signed linux-image packages for amd64
linux-image-7.0.0-1-cloud-amd64 - Linux 7.0 for x86-64 cloud (signed)
"""


def make_elf(sections: dict[str, bytes] | None = None, segment_types: tuple[int, ...] = ()) -> bytes:
    """A minimal 64-bit little-endian ELF file with these sections and program header types."""
    sections = dict(sections or {})
    sections[".shstrtab"] = b"\0" + b"".join(name.encode() + b"\0" for name in [*sections, ".shstrtab"])
    image = bytearray(64)
    phoff = len(image)
    for segment_type in segment_types:
        image += struct.pack("<IIQQQQQQ", segment_type, 0, 0, 0, 0, 0, 0, 0)
    headers = [bytes(64)]
    name_offset = 1
    for name, content in sections.items():
        headers.append(struct.pack("<IIQQQQIIQQ", name_offset, 1, 0, 0, len(image), len(content),
                                   0, 0, 1, 0))
        image += content
        name_offset += len(name) + 1
    shoff = len(image)
    image += b"".join(headers)
    image[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<QQ", image, 0x20, phoff, shoff)
    struct.pack_into("<HHHHH", image, 0x36, 56, len(segment_types), 64, len(headers),
                     len(headers) - 1)
    return bytes(image)


def module(depends: str) -> bytes:
    return make_elf({".text": b"\x90" * 8, ".modinfo": f"license=GPL\0depends={depends}\0".encode()})


# ---------------------------------------------------------------- kernel choice

def test_newest_generic_kernel_is_chosen_and_signed_preferred():
    packages = kernel.kernel_packages(APT_CACHE_SEARCH)
    assert set(packages) == {"6.1.0-56-amd64", "6.1.0-9-amd64", "6.12.117+deb12-amd64",
                             "6.12.99+deb12-amd64"}      # no cloud, rt, dbg, meta or template
    assert packages["6.1.0-56-amd64"].name == "linux-image-6.1.0-56-amd64"          # signed wins
    assert packages["6.12.117+deb12-amd64"].name == "linux-image-6.12.117+deb12-amd64-unsigned"
    newest = kernel.choose_kernel(packages, None)
    assert newest == kernel.KernelPackage("linux-image-6.12.117+deb12-amd64-unsigned",
                                         "6.12.117+deb12-amd64")


def test_kernel_can_be_pinned_and_nothing_found_is_none():
    packages = kernel.kernel_packages(APT_CACHE_SEARCH)
    assert kernel.choose_kernel(packages, "6.1.0-56-amd64").release == "6.1.0-56-amd64"
    assert kernel.choose_kernel(packages, "5.10.0-1-amd64") is None
    assert kernel.choose_kernel(kernel.kernel_packages(""), None) is None


def test_release_order_is_numeric():
    releases = ["6.1.0-9-amd64", "6.12.99+deb12-amd64", "6.1.0-56-amd64", "6.12.117+deb12-amd64"]
    assert sorted(releases, key=kernel.kernel_release_key) == [
        "6.1.0-9-amd64", "6.1.0-56-amd64", "6.12.99+deb12-amd64", "6.12.117+deb12-amd64"]


def test_apt_offline_output_is_recognised():
    assert tools.offline("Err:1 http://deb.debian.org/debian bookworm InRelease\n"
                         "  Temporary failure resolving 'deb.debian.org'")
    assert not tools.offline("E: Unable to locate package linux-image-9.9-amd64")


# ---------------------------------------------------------------- modules and ELF

def test_module_names_and_builtins():
    assert kernel.module_name("kernel/arch/x86/kvm/kvm-amd.ko.xz") == "kvm_amd"
    assert kernel.module_name("9pnet_virtio.ko") == "9pnet_virtio"
    assert kernel.builtin_modules("kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_pci.ko\n") \
        == {"virtio", "virtio_pci"}


def test_elf_section_and_modinfo_depends():
    image = module("kvm,ccp")
    assert elf.elf_section(image, ".text") == b"\x90" * 8
    assert kernel.modinfo_depends(elf.elf_section(image, ".modinfo")) == ["kvm", "ccp"]
    assert kernel.modinfo_depends(b"license=GPL\0depends=\0") == []
    with pytest.raises(ValueError, match="no .modinfo section"):
        elf.elf_section(make_elf({".text": b""}), ".modinfo")
    with pytest.raises(ValueError, match="not a 64-bit"):
        elf.elf_section(b"#!/bin/sh\n", ".modinfo")


def test_static_elf_is_one_without_an_interpreter():
    pt_load, pt_interp = 1, 3
    assert elf.is_static_elf(make_elf(segment_types=(pt_load, pt_load)))
    assert not elf.is_static_elf(make_elf(segment_types=(pt_load, pt_interp)))
    assert not elf.is_static_elf(b"#!/bin/sh\n")


def test_load_order_puts_dependencies_first_once_and_skips_builtins():
    depends = {"kvm_amd": ["kvm", "ccp"], "kvm": ["irqbypass"], "ccp": [], "irqbypass": [],
               "9p": ["netfs", "9pnet"], "9pnet": ["netfs"], "netfs": [], "9pnet_virtio": ["9pnet"]}
    order = kernel.load_order(["kvm-amd", "virtio_pci", "9pnet_virtio", "9p"], depends.__getitem__,
                             frozenset({"virtio_pci"}))
    assert order == ["irqbypass", "kvm", "ccp", "kvm_amd", "netfs", "9pnet", "9pnet_virtio", "9p"]


def test_collect_modules_reads_compressed_modules_and_fails_on_missing_ones(tmp_path):
    tree = tmp_path / "6.0.0-1-amd64"
    (tree / "kernel").mkdir(parents=True)
    (tree / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    files = {"kvm-amd.ko.xz": lzma.compress(module("kvm")), "kvm.ko.gz": gzip.compress(module("")),
             "overlay.ko": module("")}
    for name, data in files.items():
        (tree / "kernel" / name).write_bytes(data)
    order, images = kernel.collect_modules(tree, ("kvm_amd", "virtio_pci", "overlay"))
    assert order == ["kvm", "kvm_amd", "overlay"]
    assert images["kvm_amd"] == module("kvm")
    with pytest.raises(errors.InitramfsError, match="9p is neither built into 6.0.0-1-amd64"):
        kernel.collect_modules(tree, ("kvm_amd", "9p"))


def test_unknown_module_compression_names_the_file(tmp_path):
    path = tmp_path / "kvm.ko.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(errors.InitramfsError, match="kvm.ko.zst"):
        kernel.read_module(path)


# ---------------------------------------------------------------- environment and scripts

def test_guest_environment_passes_the_documented_variables_only():
    environ = {"PATH": "/venv/bin:/usr/bin", "HOME": "/root", "VIRTUAL_ENV": "/venv",
               "PYTHONPATH": "/src", "PYKVM_REQUIRE_KVM": "1", "PYTEST_ADDOPTS": "-x",
               "LC_ALL": "C.UTF-8", "TERM": "xterm", "SSH_AUTH_SOCK": "/tmp/agent",
               "LD_PRELOAD": "/lib/evil.so", "PYKVM-BAD": "x"}
    env = initramfs.guest_environment(environ, stdout_is_tty=True)
    assert env == {"PATH": "/venv/bin:/usr/bin", "HOME": "/root", "VIRTUAL_ENV": "/venv",
                   "PYTHONPATH": "/src", "PYKVM_REQUIRE_KVM": "1", "PYTEST_ADDOPTS": "-x",
                   "LC_ALL": "C.UTF-8", "TERM": "xterm", "PYTHONDONTWRITEBYTECODE": "1"}
    assert initramfs.guest_environment({}, stdout_is_tty=False)["TERM"] == "dumb"
    assert initramfs.guest_environment({}, stdout_is_tty=False)["PATH"]


def test_command_script_runs_the_exact_argv_in_cwd_with_exactly_env(tmp_path):
    cwd = tmp_path / "it's a $dir"
    cwd.mkdir()
    argv = [sys.executable, "-c", "import os, sys; print(repr((sys.argv[1:], os.getcwd(), "
            "sorted(k for k in os.environ if k.startswith('T_')), os.environ['T_VALUE'])))",
            "a b", "it's", "$HOME", "`id`", "x\ny", "*", ""]
    env = {"T_VALUE": "'; echo injected; '\n$(id)", "T_EMPTY": "", "PATH": os.environ["PATH"]}
    script = initramfs.command_script(argv, str(cwd), env)
    result = subprocess.run(["env", "-i", "/bin/sh", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr((argv[3:], str(cwd), ["T_EMPTY", "T_VALUE"],
                                          env["T_VALUE"]))


def test_command_script_reports_the_exit_status_and_a_missing_directory():
    env = {"PATH": os.environ["PATH"]}
    assert subprocess.run(["/bin/sh", "-c", initramfs.command_script(["sh", "-c", "exit 3"], "/", env)]
                          ).returncode == 3
    missing = initramfs.command_script(["true"], "/nonexistent/dir", env)
    assert subprocess.run(["/bin/sh", "-c", missing], capture_output=True).returncode \
        == errors.EXIT_RUNNER_FAILED
    with pytest.raises(ValueError):
        initramfs.command_script([], "/", env)


def test_init_script_is_valid_sh_and_runs_the_command_between_the_markers():
    markers = Markers("0123abcd")
    init = tcg_amd.init_script(markers)
    assert subprocess.run(["/bin/sh", "-n"], input=init, text=True).returncode == 0
    lines = init.splitlines()
    start = lines.index(f'echo "{markers.start}"')
    assert 'env -i /bin/chroot /host /bin/sh -c "$(cat /command.sh)" </dev/null' == lines[start + 1]
    assert lines[start + 2] == f'echo "{markers.exit}$?"'
    assert lines[-1] == "poweroff -f"
    assert 'insmod "/lib/modules/$module.ko"' in init and "[ -c /dev/kvm ]" in init


def test_qemu_command_emulates_amd_v_and_shares_root_read_only(tmp_path):
    command = qemu.qemu_command(tmp_path / "qemu", tmp_path / "vmlinuz", tmp_path / "initrd",
                                 2048, 2)
    joined = " ".join(command)
    assert command[0] == str(tmp_path / "qemu")
    assert "-accel tcg,thread=single -cpu max -m 2048 -smp 2" in joined
    assert "-no-reboot" in command and "-nographic" in command
    assert f"-kernel {tmp_path / 'vmlinuz'} -initrd {tmp_path / 'initrd'}" in joined
    assert "panic=-1" in joined and "console=ttyS0" in joined
    assert "path=/,mount_tag=hostroot,security_model=none,readonly=on" in joined


# ---------------------------------------------------------------- console

MARKERS = Markers("feedc0de")
BOOT_NOISE = b"[    0.000000] Linux version 6.12\r\nWarning: unable to open an initial console.\r\n"


def run_console(chunks: list[bytes]) -> tuple[bytes, ConsoleFilter]:
    console = ConsoleFilter(MARKERS)
    return b"".join(console.feed(chunk) for chunk in chunks), console


def console_bytes(output: bytes, status: int) -> bytes:
    return (BOOT_NOISE + MARKERS.start.encode() + b"\n" + output + MARKERS.exit.encode()
            + str(status).encode() + b"\n[ 9.1] reboot: Power down\r\n")


def test_console_passes_only_the_commands_output_and_its_status():
    output, console = run_console([console_bytes(b"kvm_amd\n", 3)])
    assert output == b"kvm_amd\n"
    assert console.started and console.exit_status == 3 and console.error is None


def test_console_finds_markers_split_across_chunks_byte_by_byte():
    data = console_bytes(b"....F..\nno newline at the end", 0)
    output, console = run_console([data[i:i + 1] for i in range(len(data))])
    assert output == b"....F..\nno newline at the end"
    assert console.exit_status == 0


def test_console_releases_a_held_partial_marker_that_was_not_one():
    prefix = MARKERS.exit.encode()[:12]
    output, console = run_console([BOOT_NOISE + MARKERS.start.encode() + b"\n", b"text " + prefix,
                                   b" continues\n"])
    assert output == b"text " + prefix + b" continues\n"
    assert console.exit_status is None


def test_console_ignores_markers_of_another_run():
    forged = Markers("00000000")
    output, console = run_console([console_bytes(f"{forged.exit}5\n".encode(), 1)])
    assert output == f"{forged.exit}5\n".encode() and console.exit_status == 1


def test_console_keeps_init_errors_and_the_tail_for_diagnostics():
    data = BOOT_NOISE + f"{MARKERS.error}insmod kvm_amd failed\r\n".encode() + b"reboot: Power down\r\n"
    output, console = run_console([data])
    assert output == b"" and not console.started and console.exit_status is None
    assert console.error == "insmod kvm_amd failed"
    assert console.tail.splitlines()[-1] == "reboot: Power down" and "\r" not in console.tail


def test_markers_are_fresh_per_run():
    assert Markers.fresh().nonce != Markers.fresh().nonce


# ---------------------------------------------------------------- command line

def test_split_command_at_the_first_double_dash():
    assert cli.split_command(["tcg-amd", "--cpus", "1", "--", "pytest", "--", "-x"]) == (
        ["tcg-amd", "--cpus", "1"], ["pytest", "--", "-x"])
    assert cli.split_command(["tcg-amd", "--prepare"]) == (["tcg-amd", "--prepare"], [])


@pytest.mark.parametrize("argv", [["tcg-amd"], ["tcg-amd", "--cpus", "0", "--", "true"],
                                  ["other-host", "--", "true"]])
def test_usage_errors_exit_2_before_doing_anything(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert "usage: python -m pykvm.hosts HOST" in capsys.readouterr().err


def test_runner_errors_are_pykvm_errors_that_carry_the_console_tail():
    error = errors.GuestTimeout("did not finish within 5 s", "last line")
    assert isinstance(error, errors.GuestFailed) and isinstance(error, PyKvmError)
    assert error.tail == "last line" and str(error).endswith("last line")
    assert issubclass(errors.MirrorUnreachable, errors.KernelUnavailable)


def test_console_tail_drops_terminal_escapes():
    output, console = run_console([b"\x1bc\x1b[?7l\x1b[2JSeaBIOS\r\nBooting from ROM..\x1bc\x1b[2J[ 3.1] Oops\r\n"])
    assert console.tail == "SeaBIOS\nBooting from ROM..[ 3.1] Oops"


def test_init_mounts_the_root_qemu_shares_and_takes_another_root_as_well(tmp_path):
    init = tcg_amd.init_script(MARKERS)
    virtfs = qemu.qemu_command(tmp_path / "qemu", tmp_path / "vmlinuz", tmp_path / "initrd", 2048, 2)[-1]
    tag = dict(option.split("=", 1) for option in virtfs.split(",") if "=" in option)["mount_tag"]
    assert f"mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose {tag} /lower" in init
    assert tcg_amd.NO_KVM in init
    # a runner whose host root comes from a disk image gives its own mount command
    disk = initramfs.init_script(MARKERS, 'mount -t ext4 -o ro /dev/vda /lower || fail "no root disk"',
                                 "kvm_intel loaded but /dev/kvm is missing")
    assert subprocess.run(["/bin/sh", "-n"], input=disk, text=True).returncode == 0
    assert "mount -t 9p" not in disk and "/dev/vda /lower" in disk


def test_tools_come_from_debian_packages():
    assert set(tcg_amd.TOOL_PACKAGES) == {"qemu-system-x86_64", "busybox", "cpio"}
    assert tools.offline("Could not resolve 'deb.debian.org'")
