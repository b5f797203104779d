"""The in-memory scenario: host set-up, VM set-up, ordered steps and stated outcomes.

A scenario comes from a TOML file (:mod:`kvmsim.scenarios.loader`) or from the builder
(:meth:`Scenario.builder`); both go through the same validation, so they produce the same
:class:`Scenario`.  The vocabulary is the kernel's: a VMA ``kind`` is a :class:`kvmsim.mm.vma.VmaKind`,
a driver ``pfn_class`` a :class:`kvmsim.mm.page.PfnClass`, memslot ``flags`` are ``KVM_MEM_*``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

POLICY_ALIASES = {"both": ("legacy", "series"), "all": ("legacy", "series", "pre-5.13")}


@dataclass
class VmaSpec:
    """One ``mmap()`` of the VMM: ``kind`` of backing, ``size`` bytes, optional driver."""

    name: str
    kind: str
    size: int
    page_size: int = 4096
    thp: bool = False
    prot: str = "rw"
    driver: str | None = None
    writenotify: bool | None = None   # override vma_wants_writenotify() (a file system without dirty accounting)
    io: bool = False                  # VM_MIXEDMAP|VM_IO (kind = "mixedmap"): GUP refuses it, KVM follows the PTE
    line: int | None = field(default=None, compare=False)


@dataclass
class DriverSpec:
    """A device driver exporting memory of one pfn class (:class:`kvmsim.mm.driver.Driver`)."""

    name: str
    pfn_class: str
    size: int | None = None          # default: the size of the VMA that maps it
    order: int = 0
    compound: bool = True
    prefault: bool = True
    pte_write: str = "always"
    mixed: bool = False
    free_rule: str = "free"
    cacheable: bool = False          # vm_page_prot: Normal (cacheable) memory rather than Device / Normal-NC
    line: int | None = field(default=None, compare=False)


@dataclass
class HostSpec:
    """The host kernel's mm settings (``[host]``)."""

    thp_zero_page: bool = True        # transparent_hugepage/use_zero_page: a read fault maps the huge zero page
    swap: bool = True                 # without swap, reclaim keeps private anonymous folios
    kernel: str = "6.13"              # host mm release: v6.13 do_huge_zero_wp_pmd(), v6.12 the PTE fallback


@dataclass
class SlotSpec:
    """One ``KVM_SET_USER_MEMORY_REGION`` at set-up time."""

    id: int
    gpa: int
    size: int
    vma: str
    offset: int = 0
    flags: tuple[str, ...] = ()
    guest_memfd: str | None = None    # a [[guest_memfd]]'s name: KVM_MEM_GUEST_MEMFD with that file
    guest_memfd_offset: int = 0
    line: int | None = field(default=None, compare=False)


@dataclass
class GuestMemfdSpec:
    """One ``KVM_CREATE_GUEST_MEMFD`` at set-up time (kvmsim.kvm.gmem)."""

    name: str
    size: int
    flags: int = 0
    line: int | None = field(default=None, compare=False)


@dataclass
class VmSpec:
    """``KVM_CREATE_VM`` and the capabilities enabled before the memslots."""

    policies: tuple[str, ...] = ("legacy", "series")
    arch: str = "x86"
    mmu: str = "tdp"
    paging: str = "direct"             # x86 shadow MMU: "indirect" is shadow paging with TDP off
    pml: bool = True
    manual_protect: bool = False
    initially_set: bool = False
    dirty_ring: int = 0
    v613_other: bool | None = None     # None: the policy's own (legacy 6.12's, series 6.13's); False: "series only"
    allow_unsafe_mappings: bool = False
    execution: str = "hardware"
    vcpus: int = 1
    mutations: tuple[str, ...] = ()    # kvmsim.explore mutation switches (a safety mechanism turned off)
    mte: bool = False                  # arm64 KVM_ENABLE_CAP(KVM_CAP_ARM_MTE) before the vCPUs
    ppc_pr_host: str = "64-bit"        # Book3S PR: book3s_64_mmu_host.c or book3s_32_mmu_host.c
    ad_enabled: bool = True            # kvm_intel.enable_ept_ad_bits / A/D bits in SPTEs
    eager_split: bool = True           # kvm.eager_page_split
    slot_zap_all: bool = True          # KVM_X86_QUIRK_SLOT_ZAP_ALL (KVM_CAP_DISABLE_QUIRKS2 clears it)
    nx_huge_pages: bool = False        # kvm.nx_huge_pages: an exec fault maps 4K
    async_pf: bool = False             # the guest enabled async #PF (MSR_KVM_ASYNC_PF_EN) on every vCPU
    maxphyaddr: int = 46               # the host's MAXPHYADDR: bounds a memslot's guest physical addresses
    ipa_bits: int = 40                 # arm64 KVM_VM_TYPE_ARM_IPA_SIZE
    cpu_vabits: int = 48               # LoongArch CPUCFG1.VALEN: gpa_size = 1 << (cpu_vabits - 1)
    gstage_pgd_levels: int = 3         # RISC-V G-stage mode: 3 Sv39x4, 4 Sv48x4, 5 Sv57x4
    dirty_ring_with_bitmap: bool = False   # KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (arm64)
    cacheable_pfnmap_supported: bool = True    # arm64 stage-2 FWB and DIC (KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED)


@dataclass
class Step:
    """One operation; ``expect`` maps ``"*"`` (every policy) or a policy name to expected fields."""

    op: str
    args: dict[str, Any]
    expect: dict[str, dict[str, Any]] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)

    def describe(self) -> str:
        from kvmsim.scenarios.ops import OP_ARGS
        schema = OP_ARGS.get(self.op, {})
        shown = []
        for k, v in self.args.items():
            if k in schema and schema[k][1] is not None and v == schema[k][1] and k != "threads":
                continue                                    # a default: not worth showing
            if k == "threads":
                shown.append("threads=" + ",".join(v))
            elif isinstance(v, int) and not isinstance(v, bool) and k in ("gpa", "offset", "size", "stride", "value"):
                shown.append(f"{k}={v:#x}")
            elif isinstance(v, list):
                shown.append(f"{k}=[{' '.join(map(str, v))}]")
            elif v is not None:
                shown.append(f"{k}={v}")
        return self.op + (" " + " ".join(shown) if shown else "")


@dataclass
class FinalExpect:
    """What a scenario states about one policy's whole run."""

    verdict: str | None = None                      # clean | violations | error
    violations: dict[str, Any] | None = None        # invariant → exact count, or {min, max}; None: unchecked
    counters: dict[str, Any] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)


@dataclass
class Scenario:
    name: str
    description: str = ""
    source: str = ""
    patches: tuple[int, ...] = ()       # the series patches it demonstrates (kvmsim.patches)
    requires: tuple[str, ...] = ()
    drivers: list[DriverSpec] = field(default_factory=list)
    vmas: list[VmaSpec] = field(default_factory=list)
    host: HostSpec = field(default_factory=HostSpec)
    vm: VmSpec = field(default_factory=VmSpec)
    memslots: list[SlotSpec] = field(default_factory=list)
    guest_memfds: list[GuestMemfdSpec] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    expect: dict[str, FinalExpect] = field(default_factory=dict)
    file: str | None = None

    @property
    def policies(self) -> tuple[str, ...]:
        """Policies the scenario states: its VM's policy list plus any ``[expect.<policy>]``."""
        out = list(self.vm.policies)
        for p in self.expect:
            if p not in out:
                out.append(p)
        return tuple(out)

    @staticmethod
    def builder(name: str, **meta: Any) -> ScenarioBuilder:
        """Start building a scenario in Python; ``.build()`` validates exactly as the loader does."""
        return ScenarioBuilder(name, **meta)


class ScenarioBuilder:
    """Fluent construction of the same document a TOML file holds::

        sc = (Scenario.builder("demo", description="...")
              .vma("ram", kind="anon", size="16K")
              .vm(policy="both")
              .memslot(id=0, gpa=0, size="16K", vma="ram")
              .step("write", gpa=0x1000, value=7, expect={"exit": "ok"})
              .expect("series", verdict="clean")
              .build())
    """

    def __init__(self, name: str, **meta: Any):
        self.doc: dict[str, Any] = {"name": name, **meta}

    def _append(self, key: str, item: dict) -> ScenarioBuilder:
        self.doc.setdefault(key, []).append(item)
        return self

    def vma(self, name: str, **kw: Any) -> ScenarioBuilder:
        return self._append("vma", {"name": name, **kw})

    def host(self, **kw: Any) -> ScenarioBuilder:
        self.doc.setdefault("host", {}).update(kw)
        return self

    def driver(self, name: str, **kw: Any) -> ScenarioBuilder:
        return self._append("driver", {"name": name, **kw})

    def vm(self, **kw: Any) -> ScenarioBuilder:
        self.doc.setdefault("vm", {}).update(kw)
        return self

    def memslot(self, **kw: Any) -> ScenarioBuilder:
        return self._append("memslot", dict(kw))

    def step(self, op: str, **kw: Any) -> ScenarioBuilder:
        return self._append("step", {"op": op, **kw})

    def expect(self, policy: str, **kw: Any) -> ScenarioBuilder:
        self.doc.setdefault("expect", {})[policy] = dict(kw)
        return self

    def build(self) -> Scenario:
        from kvmsim.scenarios.loader import scenario_from_dict
        return scenario_from_dict(self.doc, file="<builder>")
