"""Host runners: boot another KVM host in an emulator and run a command on it.

Why this exists: pykvm's conformance table and test suite must be checked on
more than the machine's own KVM. A runner boots a stock Debian kernel in an
emulator, loads a vendor module and runs the caller's command there
(``python -m pykvm.hosts tcg-amd -- COMMAND``, ``python -m pykvm.hosts
bochs-intel -- COMMAND``). The pieces, by concern:

* :mod:`.cli`: the command line (``python -m pykvm.hosts``), per-host settings, exit statuses
* :mod:`.tcg_amd`: the tcg-amd host (kvm_amd, QEMU, the root shared over 9p): needs, cache, prepare, run
* :mod:`.bochs_intel`: the bochs-intel host (kvm_intel, Bochs, a disk image): needs, cache, prepare, run
* :mod:`.kernel`: choosing, fetching and unpacking the Debian kernel; module load order (shared)
* :mod:`.initramfs`: busybox, the modules, the ``/init`` skeleton and the command script, cpio (shared)
* :mod:`.console`: the markers ``/init`` prints and the console filter (shared)
* :mod:`.emulator`: the run loop around either emulator: console, deadline, kill (shared)
* :mod:`.cache`: the cache directory, atomic writes, pruning old keys (shared)
* :mod:`.qemu`: QEMU's command line; :mod:`.bochs`: Bochs's source, build, configuration and ISO
* :mod:`.disk`: bochs-intel's ext4 image of what the command needs, and its command disk
* :mod:`.tools`: apt and the tools on the calling machine; :mod:`.elf`: ELF sections
* :mod:`.errors`: the runners' exceptions and exit statuses

Decisions are pure functions (kernel choice, load order, scripts, command
lines, bochsrc, the disk manifest's key, the console filter); the side effects
(apt, dpkg-deb, cpio, make, mkfs, the emulator) are small functions around them.
"""
