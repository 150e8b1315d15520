"""Where pykvm's mode helpers put the x86 system structures, and the GDT selectors.

Why this exists: the mode helpers (:mod:`pykvm.x86.modes`), the guest images
(assembled with these values) and custom guests must agree on which
guest-physical memory the helpers use. This module has no other imports, so
setup.py can read it before the binding is built.

====================  ==========================================================
0x0000 - 0x03FF       real-mode IVT (only real mode; handlers written there)
0x1000 - 0x1FFF       GDT (the selectors below)
0x2000 - 0x2FFF       IDT: 256 gates (protected and long mode)
0x3000 - 0x3FFF       TSS
0x4000 - 0x9FFF       identity page tables of 0..4 GiB (long mode)
below 0xF000          the default initial stack (grows down)
0x10000 and up        free: code and data
====================  ==========================================================
"""

IVT = 0x0000
GDT = 0x1000
IDT = 0x2000
TSS = 0x3000
PML4 = 0x4000
SYSTEM_AREA_END = 0xA000    # first byte the helpers leave alone
DEFAULT_STACK_TOP = 0xF000
FREE_MEMORY = 0x10000       # where custom code and data can go

# Selectors of the flat GDT (pykvm.x86.descriptors.gdt_bytes).
SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
SEL_TSS = 0x20              # 16-byte system descriptor in long mode
