"""CPU models: the guest's CPUID and machine-check banks from a QEMU-style ``-cpu`` string.

Why this exists: kvm-unit-tests chooses a CPU per test (``x86/unittests.cfg``
passes QEMU ``-cpu qemu64,-x2apic`` and the like), and what a test checks
follows from it: the xAPIC test must not see x2APIC, the MSR test walks as
many MCE banks as MCG_CAP declares, the async-PF test skips without
``kvm-asyncpf-int``. Without a model a pykvm guest would see everything KVM
supports. :func:`parse` reads QEMU's syntax, ``MODEL[,+feat][,-feat]
[,feat=on|off][,key=value]``; :meth:`CpuSpec.resolve` turns it into the CPUID
leaves of every vCPU, masked by what KVM supports, and the MCG_CAP value for
``KVM_X86_SETUP_MCE``; :meth:`GuestCpu.apply` sets both on a vCPU.

What is modelled, as QEMU 7.2 does with ``-accel kvm`` (checked by booting
the same CPUID-dumping kernel under both):

- The models the kvm-unit-tests configuration names: ``qemu64`` (QEMU's
  default for the PC machines, so :data:`DEFAULT_MODEL`), ``Opteron_G1``,
  ``IvyBridge``, ``Skylake-Server``, ``max`` and ``host``. A named model takes
  the host's vendor unless ``vendor=`` is given (QEMU does so under KVM, so
  that SYSENTER/SYSCALL behave natively), and gets QEMU's KVM defaults:
  x2APIC and the paravirtual features kvmclock, kvm-nopiodelay, kvm-asyncpf,
  kvm-steal-time, kvm-pv-eoi and kvmclock-stable-bit on; svm and monitor off.
  ``max`` and ``host`` are alike: the host's identity (vendor, family, model,
  brand) and every named feature KVM supports but invtsc (which does not
  migrate) and topoext (only on request); ``migratable=off`` takes every bit
  KVM supports in the modelled feature words, invtsc with its frequency leaf.
  ``pmu`` (leaf 0xA as KVM reports it) and ``lmce`` are on for them, off for
  the named models.
- Feature names are QEMU's (``-cpu help``), ``_`` and ``-`` alike. ``+f`` and
  ``-f`` apply after every ``f=on|off`` and ``-f`` wins, as in QEMU. Keys:
  ``vendor``, ``family``, ``model``, ``stepping``, ``level``, ``xlevel``,
  ``model-id``, ``phys-bits``, ``host-phys-bits``, ``pmu``, ``lmce``, ``migratable``.
- Topology: ``cpus`` cores in one socket, one thread each (QEMU >= 6.2's
  ``-smp N``), APIC ID = vCPU id, in leaves 1, 4, 0xB, 0x8000001D/1E and
  0x80000008; caches are QEMU's fixed legacy descriptions, not the host's.
- A feature KVM cannot offer is dropped with a warning worded as QEMU's
  (``host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]``).
  ``tsc-deadline`` counts as supported with ``KVM_CAP_TSC_DEADLINE_TIMER``.
- Machine checks: with MCE and MCA in CPUID.1:EDX and family >= 6, 10 banks
  (fewer if KVM allows fewer) and MCG_CTL_P | MCG_SER_P (| MCG_LMCE_P with
  ``lmce``) as far as KVM supports them; otherwise KVM's default.

Not modelled (a typed error names them): VMX capability features
(``vmx-*``, which live in MSRs) and Hyper-V enlightenments (``hv-*``). Leaves
for SGX, Processor Trace, AMX tiles and SEV read as zero, as under QEMU 7.2
without those features.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..core.constants import Cap
from ..core.cpuid import CpuidEntry, cpuid_for_vcpu
from ..core.errors import InvalidArgument
from ..core.system import Kvm
from ..core.vcpu import Vcpu

DEFAULT_MODEL = "qemu64"
SIGNIFICANT_INDEX = 1                 # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_LEAF = 0x40000000
KVM_FEATURES_LEAF = 0x40000001
KVM_FREQUENCY_LEAF = 0x40000010       # TSC and APIC-bus kHz (QEMU's vmware-cpuid-freq), with invtsc
APIC_BUS_KHZ = 1_000_000              # KVM's in-kernel LAPIC timer counts at 1 GHz
EXTENDED = 0x80000000
DEFAULT_PHYS_BITS = 40                # QEMU's for a named model without host-phys-bits
VIRT_BITS, VIRT_BITS_LA57 = 48, 57
PHYS_BITS_RANGE = (32, 52)
CLFLUSH_LINE_QWORDS = 8               # CPUID.1:EBX[15:8]: a 64-byte line
MWAIT_ECX = 0x3                       # CPUID.5:ECX: EMX | IBE, as QEMU reports
SVM_REVISION, SVM_ASIDS = 1, 16
MCE_BANKS = 10
MCE_MIN_FAMILY = 6
BOOL_WORDS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


class CpuModelError(InvalidArgument):
    """A bad ``-cpu`` string: an unknown model, feature or key, or a bad value; the message names it."""


class CpuFeatureWarning(UserWarning):
    """A feature the model asks for that KVM cannot offer (dropped), or phys-bits unlike the host's."""


class Reg(enum.IntEnum):
    """The four CPUID result registers."""

    EAX = 0
    EBX = 1
    ECX = 2
    EDX = 3


@dataclasses.dataclass(frozen=True)
class Word:
    """A CPUID feature word: one register of one leaf and sub-leaf."""

    leaf: int
    subleaf: int
    reg: Reg

    def describe(self) -> str:
        """QEMU's spelling in its warnings, e.g. ``CPUID.01H:ECX`` (the sub-leaf is not shown)."""
        return f"CPUID.{self.leaf:02X}H:{self.reg.name}"


# -- feature bits (Intel SDM vol. 2A "CPUID"; AMD APM vol. 3 appendix E; KVM's cpuid.rst) ------------
class Leaf1Edx(enum.IntEnum):
    FPU = 0
    VME = 1
    DE = 2
    PSE = 3
    TSC = 4
    MSR = 5
    PAE = 6
    MCE = 7
    CX8 = 8
    APIC = 9
    SEP = 11
    MTRR = 12
    PGE = 13
    MCA = 14
    CMOV = 15
    PAT = 16
    PSE36 = 17
    PN = 18
    CLFLUSH = 19
    DS = 21
    ACPI = 22
    MMX = 23
    FXSR = 24
    SSE = 25
    SSE2 = 26
    SS = 27
    HT = 28
    TM = 29
    IA64 = 30
    PBE = 31


class Leaf1Ecx(enum.IntEnum):
    PNI = 0
    PCLMULQDQ = 1
    DTES64 = 2
    MONITOR = 3
    DS_CPL = 4
    VMX = 5
    SMX = 6
    EST = 7
    TM2 = 8
    SSSE3 = 9
    CID = 10
    FMA = 12
    CX16 = 13
    XTPR = 14
    PDCM = 15
    PCID = 17
    DCA = 18
    SSE4_1 = 19
    SSE4_2 = 20
    X2APIC = 21
    MOVBE = 22
    POPCNT = 23
    TSC_DEADLINE = 24
    AES = 25
    XSAVE = 26
    AVX = 28
    F16C = 29
    RDRAND = 30
    HYPERVISOR = 31


class Leaf6Eax(enum.IntEnum):
    ARAT = 2


class Leaf7Ebx(enum.IntEnum):
    FSGSBASE = 0
    TSC_ADJUST = 1
    SGX = 2
    BMI1 = 3
    HLE = 4
    AVX2 = 5
    SMEP = 7
    BMI2 = 8
    ERMS = 9
    INVPCID = 10
    RTM = 11
    MPX = 14
    AVX512F = 16
    AVX512DQ = 17
    RDSEED = 18
    ADX = 19
    SMAP = 20
    AVX512IFMA = 21
    PCOMMIT = 22
    CLFLUSHOPT = 23
    CLWB = 24
    INTEL_PT = 25
    AVX512PF = 26
    AVX512ER = 27
    AVX512CD = 28
    SHA_NI = 29
    AVX512BW = 30
    AVX512VL = 31


class Leaf7Ecx(enum.IntEnum):
    AVX512VBMI = 1
    UMIP = 2
    PKU = 3
    WAITPKG = 5
    AVX512VBMI2 = 6
    GFNI = 8
    VAES = 9
    VPCLMULQDQ = 10
    AVX512VNNI = 11
    AVX512BITALG = 12
    AVX512_VPOPCNTDQ = 14
    LA57 = 16
    RDPID = 22
    BUS_LOCK_DETECT = 24
    CLDEMOTE = 25
    MOVDIRI = 27
    MOVDIR64B = 28
    SGXLC = 30
    PKS = 31


class Leaf7Edx(enum.IntEnum):
    AVX512_4VNNIW = 2
    AVX512_4FMAPS = 3
    FSRM = 4
    AVX512_VP2INTERSECT = 8
    MD_CLEAR = 10
    SERIALIZE = 14
    TSX_LDTRK = 16
    ARCH_LBR = 19
    AMX_BF16 = 22
    AVX512_FP16 = 23
    AMX_TILE = 24
    AMX_INT8 = 25
    SPEC_CTRL = 26
    STIBP = 27
    ARCH_CAPABILITIES = 29
    CORE_CAPABILITY = 30
    SSBD = 31


class Leaf7Sub1Eax(enum.IntEnum):
    AVX_VNNI = 4
    AVX512_BF16 = 5
    FZRM = 10
    FSRS = 11
    FSRC = 12
    AMX_FP16 = 21
    LAM = 26


class LeafDSub1Eax(enum.IntEnum):
    XSAVEOPT = 0
    XSAVEC = 1
    XGETBV1 = 2
    XSAVES = 3
    XFD = 4


class KvmFeature(enum.IntEnum):
    """CPUID.40000001H:EAX, KVM's paravirtual features."""

    KVMCLOCK = 0
    KVM_NOPIODELAY = 1
    KVM_MMU = 2
    KVMCLOCK_NEW = 3                  # the second kvmclock MSR pair; QEMU names both bits "kvmclock"
    KVM_ASYNCPF = 4
    KVM_STEAL_TIME = 5
    KVM_PV_EOI = 6
    KVM_PV_UNHALT = 7
    KVM_PV_TLB_FLUSH = 9
    KVM_PV_IPI = 11
    KVM_POLL_CONTROL = 12
    KVM_PV_SCHED_YIELD = 13
    KVM_ASYNCPF_INT = 14
    KVM_MSI_EXT_DEST_ID = 15
    KVMCLOCK_STABLE_BIT = 24


class KvmHint(enum.IntEnum):
    """CPUID.40000001H:EDX, KVM's hints."""

    KVM_HINT_DEDICATED = 0


class Ext1Ecx(enum.IntEnum):
    LAHF_LM = 0
    CMP_LEGACY = 1
    SVM = 2
    EXTAPIC = 3
    CR8LEGACY = 4
    ABM = 5
    SSE4A = 6
    MISALIGNSSE = 7
    PREFETCH_3DNOW = 8
    OSVW = 9
    IBS = 10
    XOP = 11
    SKINIT = 12
    WDT = 13
    LWP = 15
    FMA4 = 16
    TCE = 17
    NODEID_MSR = 19
    TBM = 21
    TOPOEXT = 22
    PERFCTR_CORE = 23
    PERFCTR_NB = 24


class Ext1Edx(enum.IntEnum):
    """CPUID.80000001H:EDX; on AMD its bits 0-9, 12-17, 23 and 24 mirror CPUID.1:EDX (see AMD_ALIASES)."""

    SYSCALL = 11
    NX = 20
    MMXEXT = 22
    FXSR_OPT = 25
    PDPE1GB = 26
    RDTSCP = 27
    LM = 29
    EXT_3DNOW = 30
    AMD_3DNOW = 31


class Ext7Edx(enum.IntEnum):
    INVTSC = 8


class Ext8Ebx(enum.IntEnum):
    CLZERO = 0
    XSAVEERPTR = 2
    WBNOINVD = 9
    IBPB = 12
    IBRS = 14
    AMD_STIBP = 15
    AMD_SSBD = 24
    VIRT_SSBD = 25
    AMD_NO_SSB = 26


class SvmFeature(enum.IntEnum):
    """CPUID.8000000AH:EDX."""

    NPT = 0
    LBRV = 1
    SVM_LOCK = 2
    NRIP_SAVE = 3
    TSC_SCALE = 4
    VMCB_CLEAN = 5
    FLUSHBYASID = 6
    DECODEASSISTS = 7
    PAUSE_FILTER = 10
    PFTHRESHOLD = 12
    AVIC = 13
    V_VMSAVE_VMLOAD = 15
    VGIF = 16


WORDS: dict[type[enum.IntEnum], Word] = {
    Leaf1Edx: Word(1, 0, Reg.EDX), Leaf1Ecx: Word(1, 0, Reg.ECX), Leaf6Eax: Word(6, 0, Reg.EAX),
    Leaf7Ebx: Word(7, 0, Reg.EBX), Leaf7Ecx: Word(7, 0, Reg.ECX), Leaf7Edx: Word(7, 0, Reg.EDX),
    Leaf7Sub1Eax: Word(7, 1, Reg.EAX), LeafDSub1Eax: Word(0xD, 1, Reg.EAX),
    KvmFeature: Word(KVM_FEATURES_LEAF, 0, Reg.EAX), KvmHint: Word(KVM_FEATURES_LEAF, 0, Reg.EDX),
    Ext1Ecx: Word(0x80000001, 0, Reg.ECX), Ext1Edx: Word(0x80000001, 0, Reg.EDX),
    Ext7Edx: Word(0x80000007, 0, Reg.EDX), Ext8Ebx: Word(0x80000008, 0, Reg.EBX),
    SvmFeature: Word(0x8000000A, 0, Reg.EDX),
}
# Members QEMU spells otherwise than their name in lower case with "-" for "_" (by name: IntEnum
# members of different words compare equal when their bits do).
SPELLINGS = {"SSE4_1": "sse4.1", "SSE4_2": "sse4.2", "KVMCLOCK_NEW": "kvmclock", "PREFETCH_3DNOW": "3dnowprefetch",
             "EXT_3DNOW": "3dnowext", "AMD_3DNOW": "3dnow"}
ALIASES = {"sse3": "pni", "sse4-1": "sse4.1", "sse4-2": "sse4.2", "xd": "nx", "ffxsr": "fxsr-opt", "i64": "lm"}
AMD_ALIASES = sum(1 << bit for bit in (*range(10), *range(12, 18), 23, 24))
UNMIGRATABLE = frozenset({"invtsc"})
NO_AUTOENABLE = frozenset({"topoext"})  # max and host take it only when asked for (+topoext)


@dataclasses.dataclass(frozen=True)
class Feature:
    """A named CPU feature: its bit(s) in the feature words."""

    name: str
    bits: tuple[tuple[Word, int], ...]


def _feature_table() -> dict[str, Feature]:
    bits: dict[str, list[tuple[Word, int]]] = {}
    for kind, word in WORDS.items():
        for member in kind:
            name = SPELLINGS.get(member.name, member.name.lower().replace("_", "-"))
            bits.setdefault(name, []).append((word, int(member)))
    return {name: Feature(name, tuple(where)) for name, where in bits.items()}


FEATURES = _feature_table()


class XsaveComponent(enum.IntEnum):
    """XSAVE state components (XCR0 bits; Intel SDM vol. 1 section 13.1)."""

    X87 = 0
    SSE = 1
    AVX = 2
    BNDREGS = 3
    BNDCSR = 4
    OPMASK = 5
    ZMM_HI256 = 6
    HI16_ZMM = 7
    PKRU = 9
    XTILECFG = 17
    XTILEDATA = 18


XSAVE_COMPONENT_FEATURES = {XsaveComponent.AVX: "avx", XsaveComponent.BNDREGS: "mpx", XsaveComponent.BNDCSR: "mpx",
                            XsaveComponent.OPMASK: "avx512f", XsaveComponent.ZMM_HI256: "avx512f",
                            XsaveComponent.HI16_ZMM: "avx512f", XsaveComponent.PKRU: "pku",
                            XsaveComponent.XTILECFG: "amx-tile", XsaveComponent.XTILEDATA: "amx-tile"}
XSAVE_LEGACY_SIZE = 0x240             # the legacy region and the XSAVE header
XSAVE_SUBLEAVES = 64


# -- caches: QEMU's fixed ("legacy") descriptions, which its named models and max/host report -------------
class CacheType(enum.IntEnum):
    DATA = 1
    INSTRUCTION = 2
    UNIFIED = 3


@dataclasses.dataclass(frozen=True)
class Cache:
    """One cache as CPUID.4 (Intel) and CPUID.8000001DH (AMD) describe it."""

    level: int
    type: CacheType
    size: int
    ways: int
    line: int = 64
    self_init: bool = True
    package_wide: bool = False        # shared by every core of the package, else private to a core
    no_invd_sharing: bool = False     # EDX bit 0: WBINVD/INVD does not act on the lower levels' sharers
    inclusive: bool = False
    complex_index: bool = False

    def registers(self, cpus: int) -> tuple[int, int, int, int]:
        sharing = cpus - 1 if self.package_wide else 0
        eax = self.type | self.level << 5 | self.self_init << 8 | sharing << 14
        sets = self.size // (self.ways * self.line)
        edx = self.no_invd_sharing | self.inclusive << 1 | self.complex_index << 2
        return eax, (self.ways - 1) << 22 | (self.line - 1), sets - 1, edx


KIB, MIB = 1 << 10, 1 << 20
INTEL_CACHES = (Cache(1, CacheType.DATA, 32 * KIB, 8, no_invd_sharing=True),
                Cache(1, CacheType.INSTRUCTION, 32 * KIB, 8, no_invd_sharing=True),
                Cache(2, CacheType.UNIFIED, 4 * MIB, 16, no_invd_sharing=True),
                Cache(3, CacheType.UNIFIED, 16 * MIB, 16, package_wide=True, inclusive=True, complex_index=True))
AMD_CACHES = (Cache(1, CacheType.DATA, 64 * KIB, 2, no_invd_sharing=True),
              Cache(1, CacheType.INSTRUCTION, 64 * KIB, 2, no_invd_sharing=True),
              Cache(2, CacheType.UNIFIED, 512 * KIB, 16, self_init=False),
              Cache(3, CacheType.UNIFIED, 16 * MIB, 16, package_wide=True, inclusive=True, complex_index=True))
# CPUID.2 descriptor bytes: 0x2c L1d 32K 8-way, 0x30 L1i 32K 8-way, 0x7d L2 2M 8-way, 0x4d L3 16M 16-way.
LEAF2 = (0x00000001, 0, 0x0000004D, 0x002C307D)
# CPUID.80000005H: L1 TLBs (255 entries, fully associative) and L1d/L1i 64 KiB 2-way, 64-byte lines.
EXT5 = (0x01FF01FF, 0x01FF01FF, 0x40020140, 0x40020140)
# CPUID.80000006H: L2 TLB, L2 512 KiB 16-way, L3 (as QEMU reports it) 1 MiB 16-way.
EXT6 = (0, 0x42004200, 0x02008140, 0x00808140)


# -- models ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CpuModel:
    """A named model: identity, CPUID levels and features (vendor: the host's, as QEMU under KVM)."""

    name: str
    family: int
    model: int
    stepping: int
    level: int
    xlevel: int
    model_id: str
    features: frozenset[str]


@dataclasses.dataclass(frozen=True)
class HostModel:
    """``max`` and ``host`` (the same under KVM): the host's identity and the features KVM supports."""

    name: str


P6_EDX = ("fpu de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 "
          "syscall nx lm")


def _model(name: str, signature: tuple[int, int, int], levels: tuple[int, int], model_id: str,
           features: str) -> CpuModel:
    return CpuModel(name, *signature, *levels, model_id, frozenset(features.split()))


MODELS: dict[str, CpuModel | HostModel] = {model.name: model for model in (
    _model("qemu64", (15, 107, 1), (0xD, 0x8000000A), "QEMU Virtual CPU version 2.5+",
           f"{P6_EDX} pni cx16 lahf-lm svm"),
    _model("Opteron_G1", (15, 6, 1), (5, 0x80000008), "AMD Opteron 240 (Gen 1 Class Opteron)",
           f"{P6_EDX} vme pni"),
    _model("IvyBridge", (6, 58, 9), (0xD, 0x80000008), "Intel Xeon E3-12xx v2 (Ivy Bridge)",
           f"{P6_EDX} vme pni pclmulqdq ssse3 cx16 sse4.1 sse4.2 x2apic popcnt tsc-deadline aes xsave avx "
           "f16c rdrand arat fsgsbase smep erms xsaveopt rdtscp lahf-lm"),
    _model("Skylake-Server", (6, 85, 4), (0xD, 0x80000008), "Intel Xeon Processor (Skylake)",
           f"{P6_EDX} vme pni pclmulqdq ssse3 fma cx16 pcid sse4.1 sse4.2 x2apic movbe popcnt tsc-deadline "
           "aes xsave avx f16c rdrand arat fsgsbase bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq "
           "rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl pku xsaveopt xsavec xgetbv1 pdpe1gb "
           "rdtscp lahf-lm abm 3dnowprefetch"),
    HostModel("max"),
    HostModel("host"),
)}
# What QEMU turns on and off in every named model under KVM (its KVM defaults).
KVM_DEFAULTS_ON = frozenset("kvmclock kvm-nopiodelay kvm-asyncpf kvm-steal-time kvm-pv-eoi kvmclock-stable-bit "
                            "x2apic hypervisor".split())
KVM_DEFAULTS_OFF = frozenset({"svm", "monitor", "acpi"})
# Features whose presence raises the basic or extended level QEMU reports (its automatic levels).
LEVEL_NEEDS = ((Leaf6Eax, 6), (Leaf7Ebx, 7), (Leaf7Ecx, 7), (Leaf7Edx, 7), (Leaf7Sub1Eax, 7), (LeafDSub1Eax, 0xD))
XLEVEL_NEEDS = ((Ext1Ecx, 0x80000001), (Ext1Edx, 0x80000001), (Ext7Edx, 0x80000007), (Ext8Ebx, 0x80000008),
                (SvmFeature, 0x8000000A))


# -- the host ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HostCpu:
    """What KVM offers a guest: its CPUID, the TSC-deadline timer, MCE banks and MCG_CAP bits, the brand."""

    supported: tuple[CpuidEntry, ...]
    tsc_deadline: bool
    mce_banks: int                    # KVM_CAP_MCE: 0 when KVM cannot set up machine checks
    mce_caps: int                     # KVM_X86_GET_MCE_CAP_SUPPORTED
    model_id: str = ""

    @classmethod
    def probe(cls, kvm: Kvm) -> HostCpu:
        """Ask ``kvm`` (a :class:`pykvm.Kvm`); the brand string comes from ``/proc/cpuinfo``."""
        banks = kvm.check_extension(Cap.MCE)
        return cls(kvm.supported_cpuid, bool(kvm.check_extension(Cap.TSC_DEADLINE_TIMER)), banks,
                   kvm.mce_cap_supported if banks else 0, _host_model_name())

    def entry(self, leaf: int, subleaf: int = 0) -> CpuidEntry | None:
        return next((e for e in self.supported if e.function == leaf and e.index == subleaf), None)

    def register(self, leaf: int, subleaf: int, reg: Reg) -> int:
        entry = self.entry(leaf, subleaf)
        return 0 if entry is None else _registers(entry)[reg]

    def word(self, word: Word) -> int:
        """The bits KVM supports in ``word``."""
        bits = self.register(word.leaf, word.subleaf, word.reg)
        if word == WORDS[Leaf1Ecx] and self.tsc_deadline:
            bits |= 1 << Leaf1Ecx.TSC_DEADLINE
        return bits

    @property
    def vendor(self) -> str:
        entry = self.entry(0)
        return "" if entry is None else _vendor_text(entry)

    @property
    def phys_bits(self) -> int:
        return self.register(EXTENDED | 8, 0, Reg.EAX) & 0xFF or DEFAULT_PHYS_BITS


def _host_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:      # not pathlib: the boot command starts without it
            text = cpuinfo.read()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


def _registers(entry: CpuidEntry) -> tuple[int, int, int, int]:
    return entry.eax, entry.ebx, entry.ecx, entry.edx


def _vendor_text(entry: CpuidEntry) -> str:
    return b"".join(v.to_bytes(4, "little") for v in (entry.ebx, entry.edx, entry.ecx)).decode("latin-1")


# -- parsing --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CpuSpec:
    """A parsed ``-cpu`` string: the model, the features switched, the keys given."""

    text: str
    model: CpuModel | HostModel
    enabled: frozenset[str] = frozenset()
    disabled: frozenset[str] = frozenset()
    vendor: str | None = None
    family: int | None = None
    model_number: int | None = None
    stepping: int | None = None
    level: int | None = None
    xlevel: int | None = None
    model_id: str | None = None
    phys_bits: int | None = None
    host_phys_bits: bool | None = None
    pmu: bool | None = None
    lmce: bool | None = None
    migratable: bool | None = None

    def resolve(self, host: HostCpu, cpus: int) -> GuestCpu:
        """The CPUID and MCG_CAP for ``cpus`` vCPUs on ``host``, and the warnings about what was dropped."""
        return _Builder(self, host, cpus).build()


def _int_key(low: int, high: int) -> Any:
    def convert(name: str, text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise CpuModelError(f"{name}={text}: expected an integer {low}-{high:#x} (decimal or 0x hex)")
        return value
    return convert


def _bool_key(name: str, text: str) -> bool:
    try:
        return BOOL_WORDS[text.lower()]
    except KeyError:
        raise CpuModelError(f"{name}={text}: expected on or off") from None


def _vendor_key(name: str, text: str) -> str:
    if len(text) != 12 or not text.isascii():
        raise CpuModelError(f"{name}={text}: a vendor is 12 ASCII characters, e.g. GenuineIntel or AuthenticAMD")
    return text


def _model_id_key(name: str, text: str) -> str:
    if len(text.encode("latin-1", "replace")) > 48:
        raise CpuModelError(f"{name}={text}: a model-id holds at most 48 characters")
    return text


# key -> (CpuSpec field, converter)
KEYS: dict[str, tuple[str, Any]] = {
    "vendor": ("vendor", _vendor_key), "family": ("family", _int_key(0, 0xFF + 0xF)),
    "model": ("model_number", _int_key(0, 0xFF)), "stepping": ("stepping", _int_key(0, 0xF)),
    "level": ("level", _int_key(0, 0xFF)), "xlevel": ("xlevel", _int_key(0, 0xFFFFFFFF)),
    "model-id": ("model_id", _model_id_key), "phys-bits": ("phys_bits", _int_key(*PHYS_BITS_RANGE)),
    "host-phys-bits": ("host_phys_bits", _bool_key), "pmu": ("pmu", _bool_key), "lmce": ("lmce", _bool_key),
    "migratable": ("migratable", _bool_key),
}
UNMODELLED = {"vmx-": "VMX capability features live in MSRs, which pykvm's CPU model does not set",
              "hv-": "Hyper-V enlightenments are not part of pykvm's CPU model"}


def parse(text: str | CpuSpec | None) -> CpuSpec:
    """A ``-cpu`` string as a :class:`CpuSpec` (``None``: :data:`DEFAULT_MODEL`); a spec is returned as is."""
    if text is None:
        text = DEFAULT_MODEL
    if isinstance(text, CpuSpec):
        return text
    if not isinstance(text, str):
        raise CpuModelError(f"cpu={text!r}: expected a -cpu string such as 'qemu64,-x2apic', or None")
    name, *items = text.split(",")
    model = MODELS.get(name)
    if model is None:
        raise CpuModelError(f"cpu={text!r}: unknown CPU model {name!r}{_suggest(name, MODELS)}; known models: "
                            f"{', '.join(MODELS)}")
    fields: dict[str, Any] = {}
    switched: dict[str, bool] = {}
    plus: set[str] = set()
    minus: set[str] = set()
    for item in items:
        _parse_item(text, item, fields, switched, plus, minus)
    switched.update(dict.fromkeys(plus, True))
    switched.update(dict.fromkeys(minus, False))
    return CpuSpec(text, model, frozenset(f for f, on in switched.items() if on),
                   frozenset(f for f, on in switched.items() if not on), **fields)


def _parse_item(text: str, item: str, fields: dict[str, Any], switched: dict[str, bool], plus: set[str],
                minus: set[str]) -> None:
    if item[:1] in "+-" and item[1:]:
        (plus if item[0] == "+" else minus).add(_feature_name(text, item[1:]))
        return
    key, has_value, value = item.partition("=")
    key = key.strip().replace("_", "-")
    if not key:
        raise CpuModelError(f"cpu={text!r}: an empty item {item!r}; items are +feature, -feature, "
                            f"feature=on|off or key=value, separated by single commas")
    if key in KEYS:
        field, convert = KEYS[key]
        fields[field] = convert(key, value) if has_value else _bare_key(text, key, convert)
        return
    switched[_feature_name(text, key)] = _bool_key(key, value) if has_value else True


def _bare_key(text: str, key: str, convert: Any) -> bool:
    if convert is not _bool_key:
        raise CpuModelError(f"cpu={text!r}: {key} needs a value ({key}=...)")
    return True


def _feature_name(text: str, raw: str) -> str:
    name = raw.strip().lower().replace("_", "-")
    name = ALIASES.get(name, name)
    if name in FEATURES:
        return name
    for prefix, why in UNMODELLED.items():
        if name.startswith(prefix):
            raise CpuModelError(f"cpu={text!r}: {raw}: {why}; drop it from the -cpu string")
    if name in KEYS:
        raise CpuModelError(f"cpu={text!r}: {raw} is a property, not a feature; write {name}=VALUE")
    raise CpuModelError(f"cpu={text!r}: unknown CPU feature {raw!r}{_suggest(name, FEATURES)}; known features: "
                        f"{', '.join(sorted(FEATURES))}")


def _suggest(name: str, known: Iterable[str]) -> str:
    import difflib  # here: only a misspelling pays for it

    close = difflib.get_close_matches(name, list(known), n=3)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


# -- building the leaves ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GuestCpu:
    """The CPUID of every vCPU (vCPU 0's here), MCG_CAP for KVM_X86_SETUP_MCE (0: KVM's default)."""

    entries: tuple[CpuidEntry, ...]
    mcg_cap: int
    warnings: tuple[str, ...]
    frequency_leaf: bool = False      # 0x40000010 gets each vCPU's TSC kHz

    def for_vcpu(self, apic_id: int, tsc_khz: int = 0) -> list[CpuidEntry]:
        """This vCPU's leaves: its APIC ID in leaves 1, 0xB and 0x8000001E, its TSC kHz in 0x40000010."""
        entries = []
        for entry in cpuid_for_vcpu(self.entries, apic_id):
            if entry.function == EXTENDED | 0x1E:
                entry = dataclasses.replace(entry, eax=apic_id, ebx=apic_id & 0xFF)
            elif entry.function == KVM_FREQUENCY_LEAF:
                entry = dataclasses.replace(entry, eax=tsc_khz)
            entries.append(entry)
        return entries

    def apply(self, vcpu: Vcpu) -> None:
        """``KVM_SET_CPUID2`` and, with machine checks, ``KVM_X86_SETUP_MCE`` on ``vcpu`` (before it runs)."""
        vcpu.set_cpuid(self.for_vcpu(vcpu.id, vcpu.tsc_khz if self.frequency_leaf else 0))
        if self.mcg_cap:
            vcpu.setup_mce(self.mcg_cap)

    def register(self, leaf: int, subleaf: int, reg: Reg) -> int:
        """vCPU 0's ``reg`` of ``leaf``.``subleaf`` (0 if the leaf is absent)."""
        for entry in self.entries:
            if entry.function == leaf and entry.index == subleaf:
                return _registers(entry)[reg]
        return 0

    def has(self, feature: str) -> bool:
        """Whether the guest sees ``feature`` (a QEMU name)."""
        return all(self.register(w.leaf, w.subleaf, w.reg) >> bit & 1 for w, bit in FEATURES[feature].bits)


class MceCap(enum.IntEnum):
    """IA32_MCG_CAP bits (Intel SDM vol. 3B section 16.3.1.1); the bank count is bits 7:0."""

    MCG_CTL_P = 1 << 8
    MCG_SER_P = 1 << 24
    MCG_LMCE_P = 1 << 27


class _Builder:
    """One resolution of a :class:`CpuSpec` on a :class:`HostCpu` for ``cpus`` vCPUs."""

    def __init__(self, spec: CpuSpec, host: HostCpu, cpus: int) -> None:
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise CpuModelError(f"cpus={cpus!r}: expected a positive vCPU count")
        self.spec, self.host, self.cpus = spec, host, cpus
        self.from_host = isinstance(spec.model, HostModel)
        self.warnings: list[str] = []
        self.requested = self._requested()
        self.words = {word: self.requested.get(word, 0) & host.word(word) for word in WORDS.values()}
        self._warn_dropped()
        self.vendor = spec.vendor or host.vendor
        self.signature = self._signature()

    # features
    def _requested(self) -> dict[Word, int]:
        spec, model = self.spec, self.spec.model
        if isinstance(model, HostModel):
            migratable = _pick(spec.migratable, True)
            named = _mask(f for f in FEATURES if not (migratable and f in UNMIGRATABLE))
            manual = _mask(NO_AUTOENABLE)
            words = {w: self.host.word(w) & (named.get(w, 0) if migratable else ~0) & ~manual.get(w, 0)
                     for w in WORDS.values()}
            return _switch(_switch(words, spec.enabled, True), spec.disabled, False)
        on = (model.features | KVM_DEFAULTS_ON | spec.enabled) - (KVM_DEFAULTS_OFF - spec.enabled) - spec.disabled
        return _mask(on)

    def _warn_dropped(self) -> None:
        for word in WORDS.values():          # in QEMU's order of feature words, whatever order a set gave
            lacking = self.requested.get(word, 0) & ~self.host.word(word)
            self.warnings += [_dropped(word.describe(), _bit_name(word, bit), bit)
                              for bit in range(32) if lacking >> bit & 1]

    def has(self, feature: str) -> bool:
        return all(self.words[w] >> bit & 1 for w, bit in FEATURES[feature].bits)

    # identity
    def _signature(self) -> int:
        spec, model = self.spec, self.spec.model
        if isinstance(model, CpuModel):
            family, number, stepping = model.family, model.model, model.stepping
        else:
            family, number, stepping = _decode_signature(self.host.register(1, 0, Reg.EAX))
        return _encode_signature(_pick(spec.family, family), _pick(spec.model_number, number),
                                 _pick(spec.stepping, stepping))

    @property
    def family(self) -> int:
        return _decode_signature(self.signature)[0]

    def _levels(self) -> tuple[int, int]:
        model, spec = self.spec.model, self.spec
        if isinstance(model, HostModel):
            level = self.host.register(0, 0, Reg.EAX)
            xlevel = self.host.register(EXTENDED, 0, Reg.EAX)
        else:
            level, xlevel = model.level, model.xlevel
            level = max([level] + [need for kind, need in LEVEL_NEEDS if self.requested.get(WORDS[kind])])
            xlevel = max([xlevel] + [need for kind, need in XLEVEL_NEEDS if self.requested.get(WORDS[kind])])
        xlevel = _pick(spec.xlevel, xlevel)
        return _pick(spec.level, level), xlevel if xlevel >= EXTENDED else xlevel + EXTENDED

    def _phys_bits(self) -> int:
        spec = self.spec
        host_bits = self.from_host if spec.host_phys_bits is None else spec.host_phys_bits
        if host_bits:
            return self.host.phys_bits
        if spec.phys_bits is None:
            return DEFAULT_PHYS_BITS
        if spec.phys_bits != self.host.phys_bits:
            self.warnings.append(f"Host physical bits ({self.host.phys_bits}) does not match phys-bits property "
                                 f"({spec.phys_bits})")
        return spec.phys_bits

    def _flag(self, value: bool | None) -> bool:
        return self.from_host if value is None else value

    # the leaves
    def build(self) -> GuestCpu:
        level, xlevel = self._levels()
        self.phys_bits = self._phys_bits()
        leaves: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        for leaf in range(level + 1):
            leaves.update(self._basic(leaf))
        kvm_max = KVM_FREQUENCY_LEAF if self._frequency_leaf() else KVM_FEATURES_LEAF
        leaves.update(self._kvm(kvm_max))
        for leaf in range(EXTENDED, min(xlevel, EXTENDED | 0xFF) + 1):
            leaves.update(self._extended(leaf))
        vendor = _vendor_registers(self.vendor)
        leaves[0, 0] = (level, *vendor)
        leaves[EXTENDED, 0] = (xlevel, *vendor)
        for word, bits in self.words.items():
            if (word.leaf, word.subleaf) in leaves:
                regs = list(leaves[word.leaf, word.subleaf])
                regs[word.reg] |= bits
                leaves[word.leaf, word.subleaf] = _four(regs)
        entries = tuple(CpuidEntry(leaf, sub, SIGNIFICANT_INDEX if _indexed(leaf) else 0, *regs)
                        for (leaf, sub), regs in sorted(leaves.items()))
        return GuestCpu(entries, self._mcg_cap(), tuple(self.warnings), self._frequency_leaf())

    def _basic(self, leaf: int) -> Iterator[tuple[tuple[int, int], tuple[int, int, int, int]]]:
        intel = self.vendor == "GenuineIntel"
        if leaf == 1:
            many = self.cpus > 1
            ebx = CLFLUSH_LINE_QWORDS << 8 | (self.cpus << 16 if many else 0)
            yield (1, 0), (self.signature, ebx, 0, (1 << Leaf1Edx.HT) if many else 0)
        elif leaf == 2 and intel:
            yield (2, 0), LEAF2
        elif leaf == 4 and intel:
            for index, cache in enumerate((*INTEL_CACHES, None)):
                regs = (0, 0, 0, 0) if cache is None else cache.registers(self.cpus)
                cores = (self.cpus - 1) << 26 if cache is not None else 0
                yield (4, index), (regs[0] | cores, regs[1], regs[2], regs[3])
        elif leaf == 5:
            yield (5, 0), (0, 0, MWAIT_ECX, 0)
        elif leaf == 7:
            yield (7, 0), (1 if self.words[WORDS[Leaf7Sub1Eax]] else 0, 0, 0, 0)
            if self.words[WORDS[Leaf7Sub1Eax]]:
                yield (7, 1), (0, 0, 0, 0)
        elif leaf == 0xA and self._flag(self.spec.pmu):
            yield (0xA, 0), _registers(self.host.entry(0xA) or CpuidEntry(0xA, 0, 0, 0, 0, 0, 0))
        elif leaf == 0xB:
            core_bits = (self.cpus - 1).bit_length()
            yield (0xB, 0), (0, 1, 1 << 8, 0)
            yield (0xB, 1), (core_bits, self.cpus, 2 << 8 | 1, 0)
            yield (0xB, 2), (0, 0, 2, 0)
        elif leaf == 0xD:
            yield from self._xsave()
        else:
            yield (leaf, 0), (0, 0, 0, 0)

    def _xsave(self) -> Iterator[tuple[tuple[int, int], tuple[int, int, int, int]]]:
        """Every sub-leaf of 0xD, as QEMU lists them: zero but for XSAVE's enabled components."""
        components = self._xsave_components() if self.has("xsave") else 0
        size = XSAVE_LEGACY_SIZE
        for index in range(XSAVE_SUBLEAVES):
            entry = self.host.entry(0xD, index)
            if index >= XsaveComponent.AVX and components >> index & 1 and entry is not None:
                size = max(size, entry.ebx + entry.eax)
                yield (0xD, index), _registers(entry)
            else:
                yield (0xD, index), (0, 0, 0, 0)
        if components:
            yield (0xD, 0), (components & 0xFFFFFFFF, size, size, components >> 32)

    def _xsave_components(self) -> int:
        supported = self.host.register(0xD, 0, Reg.EAX) | self.host.register(0xD, 0, Reg.EDX) << 32
        wanted = 1 << XsaveComponent.X87 | 1 << XsaveComponent.SSE
        for component, feature in XSAVE_COMPONENT_FEATURES.items():
            if all(self.requested.get(w, 0) >> bit & 1 for w, bit in FEATURES[feature].bits):
                wanted |= 1 << component
        lacking = wanted & ~supported
        for component in XsaveComponent:
            if lacking >> component & 1:
                half, bit = divmod(int(component), 32)
                self.warnings.append(_dropped(f"CPUID.0DH:{'EDX' if half else 'EAX'}", None, bit))
        return wanted & supported

    def _kvm(self, kvm_max: int) -> Iterator[tuple[tuple[int, int], tuple[int, int, int, int]]]:
        yield (KVM_LEAF, 0), _four([kvm_max, *(int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8))])
        yield (KVM_FEATURES_LEAF, 0), (0, 0, 0, 0)
        if kvm_max == KVM_FREQUENCY_LEAF:
            yield (KVM_FREQUENCY_LEAF, 0), (0, APIC_BUS_KHZ, 0, 0)

    def _frequency_leaf(self) -> bool:
        return self.has("invtsc")

    def _extended(self, leaf: int) -> Iterator[tuple[tuple[int, int], tuple[int, int, int, int]]]:
        amd = self.vendor == "AuthenticAMD"
        low = leaf & 0xFF
        if low == 1:
            ecx = 1 << Ext1Ecx.CMP_LEGACY if amd and self.cpus > 1 else 0
            edx = self.words[WORDS[Leaf1Edx]] & AMD_ALIASES if amd else 0
            yield (leaf, 0), (self.signature, 0, ecx, edx)
        elif low in (2, 3, 4):
            brand = self._model_id().encode("latin-1", "replace").ljust(48, b"\0")
            chunk = brand[(low - 2) * 16:(low - 1) * 16]
            yield (leaf, 0), _four(int.from_bytes(chunk[i:i + 4], "little") for i in range(0, 16, 4))
        elif low == 5:
            yield (leaf, 0), EXT5
        elif low == 6:
            yield (leaf, 0), EXT6
        elif low == 8:
            virt = VIRT_BITS_LA57 if self.has("la57") else VIRT_BITS
            ecx = (self.cpus - 1) | (self.cpus - 1).bit_length() << 12 if self.cpus > 1 else 0
            yield (leaf, 0), (self.phys_bits | virt << 8, 0, ecx, 0)
        elif low == 0xA and self.has("svm"):
            yield (leaf, 0), (SVM_REVISION, SVM_ASIDS, 0, 0)
        elif low == 0x1D:
            for index, cache in enumerate((*AMD_CACHES, None)):
                yield (leaf, index), (0, 0, 0, 0) if cache is None else cache.registers(self.cpus)
        elif low == 0x1E and self.has("topoext"):
            yield (leaf, 0), (0, 0, 0, 0)        # per vCPU: see GuestCpu.for_vcpu
        else:
            yield (leaf, 0), (0, 0, 0, 0)

    def _model_id(self) -> str:
        model = self.spec.model
        default = model.model_id if isinstance(model, CpuModel) else self.host.model_id
        return _pick(self.spec.model_id, default)

    def _mcg_cap(self) -> int:
        if not (self.host.mce_banks and self.has("mce") and self.has("mca") and self.family >= MCE_MIN_FAMILY):
            return 0
        wanted = MceCap.MCG_CTL_P | MceCap.MCG_SER_P | (MceCap.MCG_LMCE_P if self._flag(self.spec.lmce) else 0)
        return min(MCE_BANKS, self.host.mce_banks) | (wanted & self.host.mce_caps)


def _mask(features: Iterable[str]) -> dict[Word, int]:
    words: dict[Word, int] = {}
    for feature in features:
        for word, bit in FEATURES[feature].bits:
            words[word] = words.get(word, 0) | 1 << bit
    return words


def _switch(words: Mapping[Word, int], features: Iterable[str], on: bool) -> dict[Word, int]:
    result = dict(words)
    for word, bits in _mask(features).items():
        result[word] = result.get(word, 0) | bits if on else result.get(word, 0) & ~bits
    return result


def _bit_name(word: Word, bit: int) -> str | None:
    return next((feature.name for feature in FEATURES.values() if (word, bit) in feature.bits), None)


def _dropped(where: str, name: str | None, bit: int) -> str:
    """QEMU's warning for a feature KVM cannot offer."""
    return f"host doesn't support requested feature: {where}{'.' + name if name else ''} [bit {bit}]"


def _four(values: Iterable[int]) -> tuple[int, int, int, int]:
    eax, ebx, ecx, edx = values
    return eax, ebx, ecx, edx


def _vendor_registers(vendor: str) -> tuple[int, int, int]:
    """EBX, ECX, EDX of leaf 0 for a 12-character vendor (EBX holds bytes 0-3, EDX 4-7, ECX 8-11)."""
    raw = vendor.encode("latin-1", "replace").ljust(12, b"\0")
    ebx, edx, ecx = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    return ebx, ecx, edx


def _pick(given: Any, default: Any) -> Any:
    return default if given is None else given


def _indexed(leaf: int) -> bool:
    return leaf in (4, 7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x20, 0x24,
                    EXTENDED | 0x1D, EXTENDED | 0x20)


def _encode_signature(family: int, model: int, stepping: int) -> int:
    """CPUID.1:EAX from family, model and stepping (families above 15 use the extended family field)."""
    base, extended = (family, 0) if family <= 0xF else (0xF, family - 0xF)
    return extended << 20 | (model >> 4) << 16 | base << 8 | (model & 0xF) << 4 | stepping


def _decode_signature(eax: int) -> tuple[int, int, int]:
    base = eax >> 8 & 0xF
    family = base + (eax >> 20 & 0xFF if base == 0xF else 0)
    model = (eax >> 4 & 0xF) | ((eax >> 16 & 0xF) << 4 if base in (6, 0xF) else 0)
    return family, model, eax & 0xF
