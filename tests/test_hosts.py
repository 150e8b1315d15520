"""The pure parts of ``python -m pykvm.hosts``: no QEMU, no Bochs, no apt, no kernel needed.

The runners' decisions live in pure functions (kernel choice, module load
order, the guests' ``/init`` and command scripts, the QEMU command line,
bochsrc, the boot ISO's configuration, the disk image's manifest and key, the
command disk, per-host settings, the console filter, cache pruning); these
tests pin them. The command script, both ``/init`` scripts and the command
disk's layout are also checked by this machine's own ``sh``, and the emulator
run loop with a Python process standing in for the emulator.
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
from pykvm.hosts.runner import (
    bochs,
    bochs_intel,
    cache,
    cli,
    disk,
    elf,
    emulator,
    errors,
    initramfs,
    kernel,
    qemu,
    tcg_amd,
    tools,
)
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


# ---------------------------------------------------------------- shared: cache, emulator loop, console

def test_cache_root_is_per_host_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root("bochs-intel") == tmp_path / "pykvm" / "bochs-intel"
    assert tcg_amd.cache_root() == tmp_path / "pykvm" / "tcg-amd"
    assert bochs_intel.cache_root() == tmp_path / "pykvm" / "bochs-intel"


def test_old_keys_are_pruned_and_the_current_one_kept(tmp_path):
    for name in ("boot-aaa.iso", "boot-bbb.iso", "disk-1.img"):
        (tmp_path / name).write_bytes(b"x")
    assert cache.stale([tmp_path / "boot-aaa.iso", tmp_path / "boot-bbb.iso"], [tmp_path / "boot-bbb.iso"]) \
        == [tmp_path / "boot-aaa.iso"]
    assert cache.prune(tmp_path, "boot-*.iso", [tmp_path / "boot-bbb.iso"]) == [tmp_path / "boot-aaa.iso"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boot-bbb.iso", "disk-1.img"]
    cache.write_atomically(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data" and len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("line", [b"[   12.345678] Kernel panic - not syncing: Attempted to kill init!\r\n",
                                  b"[    9.100000] reboot: Power down\r\n",
                                  b"[    9.1] reboot: System halted\r\n"])
def test_console_sees_a_guest_that_can_run_nothing_more(line):
    _, console = run_console([BOOT_NOISE, line[:10], line[10:]])     # split inside the line
    assert console.guest_stopped and console.finished and console.exit_status is None


def test_console_is_not_finished_by_boot_noise_or_the_commands_words():
    output, console = run_console([BOOT_NOISE + MARKERS.start.encode() + b"\nreboot: Power down soon\n"])
    assert not console.finished and output == b"reboot: Power down soon\n"


def _emulator(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_emulator_loop_returns_the_status_and_kills_an_emulator_that_stays(tmp_path):
    printed = f"print('noise\\n{MARKERS.start}\\nout\\n{MARKERS.exit}7', flush=True); import time; time.sleep(60)"
    out = tmp_path / "out"
    with open(out, "wb") as output:
        status = emulator.boot(_emulator(printed), MARKERS, 30, output, "test", grace=0.1)
    assert status == 7 and out.read_bytes() == b"out\n"


def test_emulator_loop_reads_a_fifo_and_reports_a_timeout_or_a_silent_death(tmp_path):
    fifo = tmp_path / "com1"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        writes = f"open({str(fifo)!r}, 'w').write('{MARKERS.start}\\nvia fifo\\n{MARKERS.exit}0\\n')"
        with open(tmp_path / "out", "wb") as output:
            assert emulator.boot(_emulator(writes), MARKERS, 30, output, "test", console_fd=fd, grace=0) == 0
        assert (tmp_path / "out").read_bytes() == b"via fifo\n"
        with pytest.raises(errors.GuestTimeout, match="within 0.5 s"), open(os.devnull, "wb") as output:
            emulator.boot(_emulator("import time; time.sleep(60)"), MARKERS, 0.5, output, "test", console_fd=fd)
        with pytest.raises(errors.GuestFailed, match="exited with 3.*the log"), open(os.devnull, "wb") as output:
            emulator.boot(_emulator("raise SystemExit(3)"), MARKERS, 30, output, "test", console_fd=fd,
                          emulator_log=lambda: "the log")
    finally:
        os.close(fd)


@pytest.mark.parametrize("said", [*qemu.KNOWN_ABORTS, "some other failure"],
                         ids=lambda said: "known" if said in qemu.KNOWN_ABORTS else "control-unknown")
def test_an_emulator_abort_the_project_measured_is_explained_as_the_emulators(tmp_path, said):
    """QEMU 7.2 aborting on a nested guest's CR8 write is named as the emulator's failure, with its cause;
    the control, any other message, keeps the guess about the guest."""
    dies = f"import os, sys; print({MARKERS.start!r}, flush=True); sys.stderr.write({said!r}); os.abort()"
    with pytest.raises(errors.GuestFailed) as failed, open(tmp_path / "out", "wb") as output:
        emulator.boot(_emulator(dies), MARKERS, 30, output, "test", known_aborts=qemu.KNOWN_ABORTS)
    message = str(failed.value)
    assert said in message and "exited with -6" in message
    if said in qemu.KNOWN_ABORTS:
        assert "the emulator itself failed, not the guest: QEMU's TCG aborts when a nested guest" in message
        assert "kernel panic" not in message
    else:
        assert "the emulator itself" not in message and "the guest stopped while the command ran" in message


# ---------------------------------------------------------------- bochs-intel

def test_bochs_intel_init_reads_the_command_disk_and_shares_the_skeleton():
    init = bochs_intel.init_script()
    assert subprocess.run(["/bin/sh", "-n"], input=init, text=True).returncode == 0
    # the skeleton is tcg-amd's: same markers (with the nonce from the command disk), overlay, chroot
    shared = tcg_amd.init_script(Markers("$nonce")).splitlines()
    lines = init.splitlines()
    assert lines[-8:] == shared[-8:] and 'echo "PYKVM-HOSTS-START-$nonce"' in lines
    assert "nonce=$(sed -n 2p /command.disk)" in init and "sed 1,3d /command.disk > /command.sh" in init
    assert "insmod /lib/modules/kvm_intel.ko $(sed -n 3p /command.disk)" in init
    assert init.index("insmod /lib/modules/kvm_intel.ko") < init.index("[ -c /dev/kvm ]")
    assert bochs_intel.MOUNT_DISK_IMAGE in init and "mount -t 9p" not in init


def test_bochs_intel_init_runs_the_command_disks_script_under_sh(tmp_path):
    """The command disk's layout, read back by the same shell lines /init uses."""
    script = initramfs.command_script(["sh", "-c", "echo hi; exit 4"], "/", {"PATH": os.environ["PATH"]})
    data = disk.command_disk(Markers("abc123"), script, "enable_apicv=0 ept=1")
    assert len(data) == disk.CYLINDER_BYTES == 504 * 1024
    (tmp_path / "command.img").write_bytes(data)
    reader = (f"cd {tmp_path} && tr -d '\\000' < command.img > command.disk && "
              f"test \"$(head -c {len(disk.COMMAND_DISK_MAGIC)} command.img)\" = {disk.COMMAND_DISK_MAGIC} && "
              "sed -n 2p command.disk && sed -n 3p command.disk && sed 1,3d command.disk > command.sh && "
              'sh -c "$(cat command.sh)"')
    result = subprocess.run(["/bin/sh", "-c", reader], capture_output=True, text=True)
    assert result.returncode == 4 and result.stdout == "abc123\nenable_apicv=0 ept=1\nhi\n"
    with pytest.raises(ValueError, match="one line"):
        disk.command_disk(Markers("n"), script, "a\nb")
    with pytest.raises(ValueError, match="exceeds"):
        disk.command_disk(Markers("n"), "x" * disk.CYLINDER_BYTES, "")


def test_bochsrc_runs_one_vmx_cpu_with_the_disks_the_iso_and_the_fifo(tmp_path):
    build = bochs.Build(tmp_path / "bochs", tmp_path / "bios.bin", tmp_path / "vga.bin")
    text = bochs.bochsrc(build, tmp_path / "boot.iso", tmp_path / "disk.img", tmp_path / "cmd.img",
                         tmp_path / "com1", tmp_path / "log", 1024)
    for needle in (f"model={bochs.CPU_MODEL}, count=1,", "megs: 1024",
                   f"ata0-master: type=disk, path={tmp_path}/disk.img",
                   f"ata0-slave: type=disk, path={tmp_path}/cmd.img", f"path={tmp_path}/boot.iso, status=inserted",
                   f"com1: enabled=1, mode=file, dev={tmp_path}/com1", "display_library: nogui", "boot: cdrom",
                   f"romimage: file={tmp_path}/bios.bin", "clock: sync=none"):
        assert needle in text
    assert "--enable-vmx=2" in bochs.CONFIGURE and "--with-nogui" in bochs.CONFIGURE


def test_isolinux_boots_the_kernel_with_the_command_line_at_once():
    cfg = bochs.isolinux_cfg(bochs_intel.KERNEL_COMMAND_LINE)
    assert "TIMEOUT 0" in cfg and "KERNEL /vmlinuz" in cfg and "INITRD /initrd.cpio" in cfg
    assert f"APPEND {bochs_intel.KERNEL_COMMAND_LINE}" in cfg
    assert "acpi=off" in bochs_intel.KERNEL_COMMAND_LINE and "console=ttyS0" in bochs_intel.KERNEL_COMMAND_LINE


def test_bochs_source_comes_from_a_private_apt_configuration(tmp_path):
    options = bochs.private_apt_options(tmp_path)
    assert f"Dir::Etc::SourceList={tmp_path}/sources.list" in options
    assert "Dir::Etc::SourceParts=/dev/null" in options and f"Dir::State::Lists={tmp_path}/lists" in options
    assert bochs.SOURCE_LINE.startswith("deb-src ") and " trixie " in bochs.SOURCE_LINE
    assert bochs.tarball_version("bochs_3.0+dfsg.orig.tar.xz") == "3.0"
    assert bochs.tarball_version("bochs-2.7.tar.gz") == "2.7"
    assert len(bochs.tarball_version("bochs.tar")) == 8


def test_kvm_intel_loads_without_apicv_by_default_and_one_cpu_is_enforced():
    assert bochs_intel.DEFAULT_KVM_INTEL_PARAMETERS == "enable_apicv=0"
    settings = cli.host_settings("bochs-intel", None, None, None, None)
    assert settings == cli.Settings(1024, 1, 1800.0, "enable_apicv=0")
    assert cli.host_settings("bochs-intel", None, None, None, "") == cli.Settings(1024, 1, 1800.0, "")
    assert "one CPU" in cli.host_settings("bochs-intel", None, 2, None, None)
    assert "for bochs-intel" in cli.host_settings("tcg-amd", None, None, None, "enable_apicv=0")
    assert cli.host_settings("tcg-amd", None, None, 60, None) == cli.Settings(2048, 2, 60, None)


def test_module_signatures_are_stripped_and_unsigned_modules_kept():
    body = b"\x7fELF" + b"x" * 100
    signature = b"S" * 7
    info = bytes(8) + struct.pack(">I", len(signature))          # struct module_signature
    signed = body + signature + info + b"~Module signature appended~\n"
    assert initramfs.strip_module_signature(signed) == body
    assert initramfs.strip_module_signature(body) == body


def test_ldd_output_gives_the_libraries():
    out = ("\tlinux-vdso.so.1 (0x00007ffd)\n"
           "\tlibpython3.11.so.1.0 => /opt/python/lib/libpython3.11.so.1.0 (0x00007f9d)\n"
           "\t/lib64/ld-linux-x86-64.so.2 (0x00007f9df77f4000)\n"
           "\tlibfoo.so => not found\n")
    assert disk.parse_ldd(out) == ["/opt/python/lib/libpython3.11.so.1.0", "/lib64/ld-linux-x86-64.so.2"]


def test_excluded_names():
    assert disk.excluded("test", disk.STDLIB_EXCLUDES) and disk.excluded("config-3.11-x86_64", disk.STDLIB_EXCLUDES)
    assert not disk.excluded("testing.py", disk.STDLIB_EXCLUDES) and not disk.excluded("json", disk.STDLIB_EXCLUDES)
    assert disk.excluded(".git", disk.TREE_EXCLUDES) and not disk.excluded("pykvm", disk.TREE_EXCLUDES)


def test_disk_key_follows_edits_to_the_trees_but_not_the_base_pythons_timestamps():
    entries = [disk.Entry("/src/a.py", "file", "/src/a.py"), disk.Entry("/py/lib/os.py", "file", "/py/lib/os.py"),
               disk.Entry("/bin", "symlink", target="usr/bin")]
    sizes = {"/src/a.py": 10, "/py/lib/os.py": 20}
    key = disk.manifest_key(entries, sizes, {"/src/a.py": 1}, "cpython 3.11.7")
    # the base Python: only its version, file list and sizes count
    assert disk.manifest_key(entries, sizes, {"/src/a.py": 1}, "cpython 3.11.7") == key
    assert disk.manifest_key(entries, sizes, {"/src/a.py": 1}, "cpython 3.11.8") != key
    assert disk.manifest_key(entries, {**sizes, "/py/lib/os.py": 21}, {"/src/a.py": 1}, "cpython 3.11.7") != key
    assert disk.manifest_key(entries[:2], sizes, {"/src/a.py": 1}, "cpython 3.11.7") != key
    # the edited trees: their modification times count too
    assert disk.manifest_key(entries, sizes, {"/src/a.py": 2}, "cpython 3.11.7") != key


def test_disk_manifest_holds_the_trees_python_binutils_and_libraries_but_no_bytecode_in_the_key(tmp_path):
    (tmp_path / "work" / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "work" / "pkg" / "m.py").write_text("x = 1\n")
    (tmp_path / "work" / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"pyc")
    (tmp_path / "work" / ".git").mkdir()
    (tmp_path / "work" / ".git" / "HEAD").write_text("ref")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF")
    found = disk.manifest(tmp_path / "work", busybox, ldd_cache=tmp_path / "ldd.json")
    paths = {entry.path for entry in found.entries}
    assert f"{tmp_path}/work/pkg/m.py" in paths and f"{tmp_path}/work/.git/HEAD" not in paths
    assert [e.path for e in found.bytecode if str(tmp_path) in e.path] == \
        [f"{tmp_path}/work/pkg/__pycache__/m.cpython-311.pyc"]
    assert not any("__pycache__" in path for path in paths)
    assert f"{tmp_path}/work/pkg/m.py" in found.edited
    assert any(path.endswith("/python3") or "/python3." in path for path in paths)
    assert {os.path.basename(p) for p in paths} >= {"os.py", "busybox", "sh", "passwd"}
    assert any("libc.so" in path for path in paths)                  # from ldd
    import shutil
    if shutil.which("as"):
        assert any(path.endswith(("/as", "-as")) for path in paths)
    key = disk.image_key(found)
    (tmp_path / "work" / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"rewritten pyc")
    again = disk.manifest(tmp_path / "work", busybox, ldd_cache=tmp_path / "ldd.json")
    assert disk.image_key(again) == key
    os.utime(tmp_path / "work" / "pkg" / "m.py", ns=(1, 1))
    assert disk.image_key(disk.manifest(tmp_path / "work", busybox, ldd_cache=tmp_path / "ldd.json")) != key


def test_disk_image_is_whole_cylinders_with_room_to_spare():
    size = disk.disk_bytes(100 * 2**20, 5000)
    assert size % disk.CYLINDER_BYTES == 0 and size > 100 * 2**20 * 1.2


def test_bochs_intel_tools_come_from_debian_packages():
    assert bochs_intel.TOOL_PACKAGES[bochs_intel.ISOLINUX_BIN] == "isolinux"
    assert {"genisoimage", "busybox", "cpio", "mkfs.ext4"} <= set(bochs_intel.TOOL_PACKAGES)
    assert tools.locate_tool("/nonexistent/isolinux.bin") is None
    assert tools.locate_tool(sys.executable) == __import__("pathlib").Path(sys.executable)


def test_kvm_amd_takes_parameters_for_a_run_and_refuses_unsafe_ones():
    default = tcg_amd.init_script(MARKERS)
    assert default == tcg_amd.init_script(MARKERS, "") and "parameters=" not in default
    init = tcg_amd.init_script(MARKERS, "npt=0 avic=1")
    assert subprocess.run(["/bin/sh", "-n"], input=init, text=True).returncode == 0
    assert '[ "$module" = kvm_amd ] && parameters="npt=0 avic=1"' in init
    assert 'insmod "/lib/modules/$module.ko" $parameters' in init
    assert init.index("insmod") < init.index("[ -c /dev/kvm ]")
    settings = cli.host_settings("tcg-amd", None, None, None, None, "npt=0")
    assert settings == cli.Settings(2048, 2, 1200.0, None, "npt=0")
    assert cli.host_settings("tcg-amd", None, None, None, None) == cli.Settings(2048, 2, 1200.0, None, "")
    assert "for tcg-amd" in cli.host_settings("bochs-intel", None, None, None, None, "npt=0")
    for unsafe in ("npt=0; reboot", "npt=$(id)", "a\nb", " npt=0"):
        assert "--kvm-amd-parameters" in cli.host_settings("tcg-amd", None, None, None, None, unsafe)
        with pytest.raises(ValueError, match="name=value"):
            tcg_amd.init_script(MARKERS, unsafe)
