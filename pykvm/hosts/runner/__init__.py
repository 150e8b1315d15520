"""Host runners: boot another KVM host in an emulator and run a command on it.

Why this exists: pykvm's conformance table and test suite must be checked on
more than the machine's own KVM. A runner boots a stock Debian kernel in an
emulator, loads a vendor module and runs the caller's command there
(``python -m pykvm.hosts tcg-amd -- COMMAND``). The pieces, by concern:

* :mod:`.cli`: the command line (``python -m pykvm.hosts``), exit statuses
* :mod:`.tcg_amd`: the tcg-amd host: what it needs, its cache, prepare and run
* :mod:`.kernel`: choosing, fetching and unpacking the Debian kernel; module load order
* :mod:`.initramfs`: busybox, the modules, ``/init`` and the command script, cpio
* :mod:`.qemu`: the QEMU command line and the run loop
* :mod:`.console`: the markers ``/init`` prints and the console filter
* :mod:`.tools`: apt and the tools on the calling machine; :mod:`.elf`: ELF sections
* :mod:`.errors`: the runners' exceptions and exit statuses

Decisions are pure functions (kernel choice, load order, scripts, the command
line, the console filter); the side effects (apt, dpkg-deb, cpio, the emulator)
are small functions around them.
"""
