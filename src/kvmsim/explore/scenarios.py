"""Built-in races to explore: a deterministic setup, named kernel-path threads and a final check.

Every scenario runs with one 4 KiB memslot at gpa 0 and one vCPU, on the generic stage-2
(:class:`kvmsim.kvm.stage2.GenericStage2`, the default) or, for the scenarios that list it in
``arches``, on the x86 TDP MMU (:class:`kvmsim.x86.mmu.X86Mmu`): ``SCENARIOS[name].on("x86")``, or on
arm64's ``user_mem_abort()`` (:class:`kvmsim.arm64.mmu.Arm64Mmu`), whose v6.12 order dirties the folio
after ``read_unlock()`` without any mutation: ``fault-vs-truncate`` finds INV-3 there under legacy.
On RISC-V's ``kvm_riscv_gstage_map()`` (:class:`kvmsim.riscv.mmu.RiscvMmu`) it finds INV-3 under the
series instead: a retried fault counts as used, and dirties the truncated folio under ``mmu_lock``.
On LoongArch's ``kvm_map_page()`` it finds INV-3 under legacy (``kvm_set_pfn_dirty()`` after
``spin_unlock()``); the LoongArch and MIPS fast-path and accessed-after-put races are their own
scenarios (``loongarch-*``, ``mips-*``: :mod:`kvmsim.loongarch.mmu`, :mod:`kvmsim.mips.mmu`).
Threads are kernel paths (``@kpath`` generators): the vCPU's ``page_fault``, the host's
``munmap``/``mprotect``/``writeback_folio``, a truncate, a pfncache refresh, or a guest write through
the SPTE (:func:`guest_write`).  ``watch`` picks the
violations the scenario is about: legacy breaks some invariants on *every* schedule (e.g. INV-3,
accessed marked after unlock), which would otherwise drown the race being explored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from kvmsim.errors import UsageError
from kvmsim.explore.mutations import install
from kvmsim.x86.mmu import kvm_zap_gfn_range
from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host
from kvmsim.mm.reclaim import reclaim, truncate_page, writeback_folio
from kvmsim.mm.vma import VmaKind
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SIZE
from kvmsim.uapi import KVM_MEM

GPA = 0


@dataclass
class World:
    host: Host
    kvm: Kvm
    vcpu: Any
    vma: Any
    threads: dict[str, Steps] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    doc: str
    setup: Callable[..., World]                  # setup(policy, mutations, arch) -> World
    watch: Callable[[Any], bool]
    final: Callable[[World], None] = lambda w: None
    arches: tuple[str, ...] = ("generic", "x86", "arm64", "riscv", "loongarch", "mips", "ppc-book3s-hv", "ppc-book3s-radix", "ppc-book3s-pr", "ppc-e500")
    arch: str = "generic"

    def build(self, policy: str, mutations) -> World:
        return self.setup(policy, mutations, self.arch)

    def on(self, arch: str) -> "Scenario":
        """The same race on another stage-2 MMU."""
        if arch not in self.arches:
            raise UsageError(f"scenario {self.name!r} runs on {', '.join(self.arches)}, not {arch!r}")
        return replace(self, arch=arch)


def _world(policy: str, mutations, arch: str, kind: VmaKind, flags=KVM_MEM(0)) -> World:
    host = Host()
    kvm = Kvm(host, policy=policy, arch=arch)
    install(kvm, mutations)
    vma = host.mm.mmap(PAGE_SIZE, kind)
    kvm.set_user_memory_region(0, GPA, PAGE_SIZE, vma.start, flags)
    return World(host, kvm, kvm.create_vcpu(), vma)


def _invs(*ids: str) -> Callable[[Any], bool]:
    return lambda v: v.invariant in ids


@kpath
def guest_write(kvm, vcpu, gpa: int, value: int) -> Steps:
    """A guest store: through a present SPTE (hardware sets D; a Host-writable read-only SPTE is
    made writable by the lockless fast page fault first), else an EPT violation → ``page_fault``."""
    arch = kvm.arch
    gfn = gpa >> 12
    for _ in range(4):
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None:                                # deleted meanwhile: an MMIO exit
            return False
        pfns, bits = arch._tables(slot)
        i = gfn - slot.base_gfn
        b = int(bits[i])
        if b & 1 and b & (2 | 4):                       # present and W or Host-writable
            arch.guest_access(vcpu, gpa, True, value)   # fast path: W|D set, then the store lands
            yield "guest: store through the SPTE (fast page fault sets W, hardware sets D)"
            return True
        yield "guest: EPT violation"
        yield from arch.page_fault.steps(vcpu, gpa, write=True)
    return False


# ---- the scenarios -----------------------------------------------------------------------------------

def _fault_vs_munmap(policy, mutations, arch) -> World:
    w = _world(policy, mutations, arch, VmaKind.ANON)
    w.host.mm.host_access(w.vma.start, True, 1)
    w.threads = {"vcpu0": w.kvm.arch.page_fault.steps(w.vcpu, GPA, write=True),
                 "host": w.host.mm.munmap.steps(w.vma.start, PAGE_SIZE)}
    return w


def _fault_vs_mprotect(policy, mutations, arch) -> World:
    w = _world(policy, mutations, arch, VmaKind.ANON)
    w.host.mm.host_access(w.vma.start, True, 1)
    w.threads = {"vcpu0": w.kvm.arch.page_fault.steps(w.vcpu, GPA, write=True),
                 "host": w.host.mm.mprotect.steps(w.vma.start, PAGE_SIZE, "none")}
    return w


def _file_page(w: World, value: int) -> int:
    w.host.mm.host_access(w.vma.start, True, value)
    return w.host.mm.pte_of(w.vma.start)[1]


def _fault_vs_writeback(policy, mutations, arch) -> World:
    w = _world(policy, mutations, arch, VmaKind.FILE)
    pfn = _file_page(w, 1)
    w.threads = {"vcpu0": w.kvm.arch.page_fault.steps(w.vcpu, GPA, write=True),
                 "host": writeback_folio.steps(w.host.mm, pfn)}
    return w


def _fault_vs_truncate(policy, mutations, arch) -> World:
    w = _world(policy, mutations, arch, VmaKind.FILE)
    writeback_folio(w.host.mm, _file_page(w, 1))          # start from a clean, written-back folio
    w.threads = {"vcpu0": w.kvm.arch.page_fault.steps(w.vcpu, GPA, write=True),
                 "host": truncate_page.steps(w.host.mm, w.vma, w.vma.pgoff)}
    return w


def _pfncache_vs_munmap(policy, mutations, arch) -> World:
    from kvmsim.kvm.pfncache import GfnToPfnCache
    w = _world(policy, mutations, arch, VmaKind.ANON)
    w.host.mm.host_access(w.vma.start, True, 1)
    gpc = GfnToPfnCache(w.kvm)
    gpc.active, gpc.gpa = True, GPA
    w.extra["gpc"] = gpc
    w.threads = {"vcpu0": gpc.refresh_steps.steps(), "host": w.host.mm.munmap.steps(w.vma.start, PAGE_SIZE)}
    return w


def _pfncache_final(w: World) -> None:
    gpc = w.extra["gpc"]
    if gpc.valid:                                 # kvmclock update through a cache still marked valid
        gpc.kvm.phys.write(gpc.pfn, 2, "gpc write", kvm=True)
        if gpc.kvm.phys.is_poisoned(gpc.pfn):
            gpc.kvm.journal.fact("gpc_uaf", pfn=gpc.pfn, kvm=True, caller="gpc write",
                                 detail="pfncache writes a freed page")


def _lost_dirty_bit(policy, mutations, arch) -> World:
    """A clean file folio mapped by a present, read-only, Host-writable SPTE with D clear.

    The file system has no dirty accounting (``vma_wants_writenotify()`` false), so a host read
    fault maps the page writable-but-clean; the guest's read fault under dirty logging installs a
    Host-writable SPTE without W.  Then a zap races the guest's store.

    Generic stage-2 only.  On x86 the state cannot arise: ``make_spte()`` gives every writable
    SPTE the D bit (read faults included, ACC_ALL), so D is clear on a present SPTE only after
    ``clear_dirty_pt_masked()`` cleared it, and legacy x86 marks the folio dirty right there
    (tdp_mmu.c v6.12, removed by patch 8 "KVM: x86/mmu: Mark folio dirty when creating SPTE, not when
    zapping/modifying"); the folio can only be cleaned again through ``folio_mkclean()``, whose
    mmu_notifier zaps the SPTE first.
    """
    w = _world(policy, mutations, arch, VmaKind.FILE, KVM_MEM.LOG_DIRTY_PAGES)
    w.vma.writenotify = False
    w.host.mm.host_access(w.vma.start, False)
    w.kvm.arch.page_fault(w.vcpu, GPA, write=False)
    w.extra["pfn"] = w.host.mm.pte_of(w.vma.start)[1]
    w.threads = {"vcpu0": guest_write.steps(w.kvm, w.vcpu, GPA, 0xD1),
                 "zap": kvm_zap_gfn_range.steps(w.kvm, GPA >> 12)}
    return w


def _vsie_vs_driver_teardown(policy, mutations, arch) -> World:
    """s390: guest 2's SCB at gpa 0 in a driver's VM_PFNMAP memory (refcounted pages it frees by its own
    rule); ``kvm_s390_handle_vsie()`` (pinned while guest 3 runs) against the driver's teardown."""
    from kvmsim.s390.vsie import ScbFields, kvm_s390_handle_vsie
    host = Host()
    kvm = Kvm(host, policy=policy, arch=arch)
    install(kvm, mutations)
    drv = host.add_driver("gpu", 1, "driver_refcounted", free_rule="free")
    vma = host.mm.mmap(PAGE_SIZE, VmaKind.PFNMAP, driver=drv)
    kvm.set_user_memory_region(0, GPA, PAGE_SIZE, vma.start, 0)
    w = World(host, kvm, kvm.create_vcpu(), vma)
    w.threads = {"vcpu0": kvm_s390_handle_vsie.steps(w.vcpu, GPA, ScbFields()), "driver": _teardown.steps(host, drv)}
    return w


@kpath
def _teardown(host, drv) -> Steps:
    """The driver's teardown (zap, then free by its rule), one step."""
    drv.teardown(host.mm)
    yield "driver: unmap_mapping_range + free its pages"


def _writeback_and_reclaim(w: World) -> None:
    """The end of the story: write the file back, then reclaim the page (until it goes)."""
    mm = w.host.mm
    pfn = mm.pte_of(w.vma.start)[1]
    if pfn >= 0:
        writeback_folio(mm, pfn)
    for _ in range(3):
        if reclaim(mm, w.vma.start, PAGE_SIZE)["reclaimed"]:
            break


def _mips_fault_vs_munmap(policy, mutations, arch) -> World:
    """A MIPS write fault that takes the slow path (no GPA PTE yet) races munmap: v6.12
    ``kvm_mips_map_page()`` puts its page and *then* calls ``kvm_set_pfn_accessed()``; when munmap ran
    after ``spin_unlock()``, KVM's put frees the page and the mark lands on a freed page (patch 71)."""
    return _fault_vs_munmap(policy, mutations, arch)


def _mips_fast_vs_munmap(policy, mutations, arch) -> World:
    """An old MIPS GPA PTE (mapped, then aged by ``clear_young``): the next guest load takes
    ``_kvm_mips_map_page_fast()``, which makes it young and, in v6.12, calls ``kvm_set_pfn_accessed()``
    after ``spin_unlock()`` holding no reference (patch 70); a munmap in that window frees the page."""
    w = _world(policy, mutations, arch, VmaKind.ANON)
    w.host.mm.host_access(w.vma.start, True, 1)
    w.kvm.arch.page_fault(w.vcpu, GPA, write=False)
    w.host.mm.clear_young(w.vma.start, w.vma.start + PAGE_SIZE)
    w.threads = {"vcpu0": w.kvm.arch.page_fault.steps(w.vcpu, GPA, write=False),
                 "host": w.host.mm.munmap.steps(w.vma.start, PAGE_SIZE)}
    return w


def _loongarch_fast_vs_truncate(policy, mutations, arch) -> World:
    """A LoongArch GPA PTE with ``_PAGE_WRITE`` but not ``_PAGE_DIRTY`` (a read fault on a file page the
    host maps writable): the guest store takes ``kvm_map_page_fast()``, which in v6.12
    dirties the folio after ``spin_unlock()`` (holding a transient ``get_page()``, patch 65); a truncate
    in that window leaves it dirtying a folio the page cache no longer has."""
    w = _world(policy, mutations, arch, VmaKind.FILE)
    _file_page(w, 1)                                      # a host store: the host PTE is writable
    w.kvm.arch.page_fault(w.vcpu, GPA, write=False)      # a read fault: _PAGE_WRITE without _PAGE_DIRTY
    w.threads = {"vcpu0": w.kvm.arch.page_fault.steps(w.vcpu, GPA, write=True),
                 "host": truncate_page.steps(w.host.mm, w.vma, w.vma.pgoff)}
    return w


def _tlbwe_vs_truncate(policy, mutations, arch) -> World:
    """PPC e500: a guest ``tlbwe`` premaps a file page (``kvmppc_e500_shadow_map()``) while it is truncated."""
    from kvmsim.ppc.e500_mmu_host import BOOK3E_PAGESZ_4K, MAS3_ALL
    w = _world(policy, mutations, arch, VmaKind.FILE)
    writeback_folio(w.host.mm, _file_page(w, 1))
    w.threads = {"vcpu0": w.kvm.arch.kvmppc_e500_emul_tlbwe.steps(w.vcpu, 0, 0, GPA, GPA, BOOK3E_PAGESZ_4K, MAS3_ALL),
                 "host": truncate_page.steps(w.host.mm, w.vma, w.vma.pgoff)}
    return w


def _freed_page_mark(v) -> bool:
    return v.invariant == "INV-3" and "on a freed page" in v.detail


def _truncated_dirty(v) -> bool:
    return v.invariant == "INV-5" or v.invariant == "INV-3" and (
        "after its mapping was truncated" in v.detail or "SetPageDirty" in v.detail and "after dropping" not in v.detail)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("fault-vs-munmap", "vCPU write fault on anon memory races munmap of that memory",
             _fault_vs_munmap, _invs("INV-5", "INV-6")),
    Scenario("fault-vs-mprotect", "vCPU write fault races mprotect(PROT_NONE)",
             _fault_vs_mprotect, _invs("INV-5", "INV-6")),
    Scenario("fault-vs-writeback", "vCPU write fault on a file folio races writeback (folio_mkclean)",
             _fault_vs_writeback, _invs("INV-4", "INV-5")),
    Scenario("fault-vs-truncate", "vCPU write fault on a file folio races truncate of that page",
             _fault_vs_truncate, _truncated_dirty),
    Scenario("pfncache-refresh-vs-munmap", "pfncache refresh races munmap; then KVM writes through the cache",
             _pfncache_vs_munmap, _invs("INV-5", "INV-6"), _pfncache_final),
    Scenario("lost-dirty-bit", "zap of a Host-writable SPTE races a guest store; then writeback + reclaim",
             _lost_dirty_bit,
             lambda v: v.invariant == "INV-4" and v.objects.get("caller") == "shrink_folio_list",
             _writeback_and_reclaim, arches=("generic",)),
    Scenario("vsie-vs-driver-teardown", "s390 vSIE with guest 2's SCB in driver memory races the driver's teardown",
             _vsie_vs_driver_teardown, _invs("INV-3", "INV-5"), arches=("s390",), arch="s390"),
    Scenario("mips-accessed-after-put", "MIPS kvm_mips_map_page() write fault races munmap; v6.12 marks "
             "accessed after its own put", _mips_fault_vs_munmap, _freed_page_mark, arches=("mips",), arch="mips"),
    Scenario("mips-fast-accessed-vs-munmap", "MIPS _kvm_mips_map_page_fast() on an old PTE races munmap; v6.12 "
             "marks accessed after unlock with no reference", _mips_fast_vs_munmap, _freed_page_mark,
             arches=("mips",), arch="mips"),
    Scenario("loongarch-fast-dirty-vs-truncate", "LoongArch kvm_map_page_fast() store to a clean PTE races "
             "truncate; v6.12 dirties the folio after unlock", _loongarch_fast_vs_truncate, _truncated_dirty,
             arches=("loongarch",), arch="loongarch"),
    Scenario("tlbwe-vs-truncate", "e500 tlbwe premap races truncate: v6.12 ages the retried, unused page after unlock",
             _tlbwe_vs_truncate, _invs("INV-5", "INV-7"), arches=("ppc-e500",), arch="ppc-e500"),
)}
