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
from kvmsim.kvm.arch import ARCH_NAMES
from kvmsim.x86.mmu import kvm_zap_gfn_range
from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host
from kvmsim.mm.reclaim import reclaim, truncate_page, writeback_folio
from kvmsim.mm.vma import VmaKind
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SIZE
from kvmsim.uapi import KVM_MEM, KVM_MEMORY_ATTRIBUTE_PRIVATE

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
    #: Every stage-2 profile (generic first) but s390's gmap, which has no KVM leaves to race with.
    arches: tuple[str, ...] = ("generic", *(a for a in ARCH_NAMES if a not in ("generic", "s390")))
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


def _apic_reload_vs_migrate(policy, mutations, arch) -> World:
    """x86 VMX: KVM's APIC-access page (the internal memslot at 0xfee00000, faulted in by a first reload)
    is migrated while a vCPU handles KVM_REQ_APIC_PAGE_RELOAD (``vmx_set_apic_access_page_addr()``):
    v6.12 releases the page after ``read_unlock()`` (patch 50 "KVM: VMX: Hold mmu_lock until page is
    released when updating APIC access page"), whatever the migration did; v6.13 before it."""
    from kvmsim.x86.vmx import kvm_alloc_apic_access_page, kvm_vcpu_reload_apic_access_page
    w = _world(policy, mutations, arch, VmaKind.ANON)
    kvm_alloc_apic_access_page(w.kvm)
    kvm_vcpu_reload_apic_access_page(w.vcpu)
    w.threads = {"vcpu0": kvm_vcpu_reload_apic_access_page.steps(w.vcpu),
                 "host": _migrate_apic_page.steps(w.host, w.kvm)}
    return w


@kpath
def _migrate_apic_page(host, kvm) -> Steps:
    """``migrate_pages()`` of the APIC-access page: -EAGAIN while KVM holds its reference."""
    from kvmsim.errors import ModelError, errno_name
    from kvmsim.mm.reclaim import migrate_page
    from kvmsim.x86.vmx import kvm_apic_access
    try:
        migrate_page(host.mm, kvm_apic_access(kvm).hva)
        yield "migrate: APIC-access page moved (invalidate → KVM_REQ_APIC_PAGE_RELOAD)"
    except ModelError as e:
        yield f"migrate: {errno_name(e.errno)} (KVM holds a reference)"


def _apic_final(w: World) -> None:
    """The vCPU's next entry handles a reload the migration requested."""
    from kvmsim.x86.vmx import kvm_vcpu_reload_apic_access_page
    kvm_vcpu_reload_apic_access_page(w.vcpu, force=False)


def _private_fault_vs_punch_hole(policy, mutations, arch) -> World:
    """x86 private write fault on a guest_memfd page races fallocate(PUNCH_HOLE) of that page
    (kvm_gmem_punch_hole(): invalidate the binding, truncate the folio, end the invalidation)."""
    from kvmsim.kvm.gmem import GuestMemfd, kvm_gmem_punch_hole
    from kvmsim.kvm.memory_attributes import kvm_vm_ioctl_set_mem_attributes
    host = Host()
    kvm = Kvm(host, policy=policy, arch=arch)
    install(kvm, mutations)
    g = GuestMemfd(kvm, PAGE_SIZE)
    kvm.set_user_memory_region(0, GPA, PAGE_SIZE, 0, KVM_MEM.GUEST_MEMFD, guest_memfd=g)
    kvm_vm_ioctl_set_mem_attributes(kvm, GPA, PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    w = World(host, kvm, kvm.create_vcpu(), None)

    def punch() -> Steps:
        kvm_gmem_punch_hole(kvm, g, 0, 1)
        yield "kvm_gmem_punch_hole: invalidated and truncated"
    w.threads = {"vcpu0": kvm.arch.page_fault.steps(w.vcpu, GPA, write=True), "host": punch()}
    return w




def _shadow_sync_vs_munmap(policy, mutations, arch) -> World:
    """x86 shadow paging (:mod:`kvmsim.x86.paging_tmpl`): the guest wrote gva 0x200000 → gpa 0x5000, then made
    the gPTE read-only (its store unsynced the shadow page); its INVLPG's ``FNAME(sync_spte)`` races a munmap
    of that guest page.  When the sync runs first, v6.12 rebuilds the SPTE without A and D and
    ``mmu_spte_update()`` marks the folio from the SPTE's pfn (patch 7 "KVM: x86/mmu: Mark new SPTE as
    Accessed when synchronizing existing SPTE"; patch 8 and 82 removed the marks); when the munmap's zap
    runs first there is nothing to sync."""
    from kvmsim.x86.paging_tmpl import PT, guest_pte_write, kvm_mmu_invalidate_addr
    host = Host()
    kvm = Kvm(host, policy=policy, arch="x86", mmu="shadow", paging="indirect")
    install(kvm, mutations)
    vma = host.mm.mmap(4 << 20, VmaKind.ANON)
    kvm.set_user_memory_region(0, GPA, 4 << 20, vma.start, 0)
    w = World(host, kvm, kvm.create_vcpu(), vma)
    flags = PT.PRESENT | PT.ACCESSED | PT.DIRTY
    guest_pte_write(kvm.arch, w.vcpu, 0x200000, 0x5000, flags | PT.WRITABLE, 0x1000)
    w.vcpu.write(0x200000, 7)
    guest_pte_write(kvm.arch, w.vcpu, 0x200000, 0x5000, flags, None)
    w.threads = {"vcpu0": kvm_mmu_invalidate_addr.steps(kvm.arch, w.vcpu, 0x200000),
                 "host": host.mm.munmap.steps(vma.start + 0x5000, PAGE_SIZE)}
    return w


# ---- 3- and 4-thread races ------------------------------------------------------------------------

@kpath
def kvm_vm_ioctl_get_dirty_log(kvm, slot_id: int) -> Steps:
    """``KVM_GET_DIRTY_LOG`` as a thread: it waits for ``mmu_lock`` like any writer, then
    ``kvm_get_dirty_log_protect()`` harvests the bitmap and write-protects the dirty pages under one
    hold (virt/kvm/kvm_main.c, v6.12 and v6.13 alike: :func:`kvmsim.kvm.dirty.kvm_get_dirty_log`)."""
    from kvmsim.kvm.dirty import kvm_get_dirty_log
    yield from kvm.mmu_lock.write_lock.steps()
    kvm.mmu_lock.write_unlock()                       # nothing runs in between: the ioctl's own hold
    out = kvm_get_dirty_log(kvm, slot_id)
    yield f"kvm_get_dirty_log_protect: {int(out.sum())} dirty page(s) harvested, SPTEs write-protected"
    return out


@kpath
def mmu_notifier_clear_young(mm, start: int, end: int) -> Steps:
    """Page aging (``folio_referenced()`` / MGLRU's walk, mm/rmap.c, mm/vmscan.c) asking the secondary
    MMUs: ``mmu_notifier_clear_young()`` → ``kvm_mmu_notifier_clear_young()``, which takes
    ``mmu_lock`` and clears the Accessed bits of the range (``kvm_age_gfn()``)."""
    from kvmsim.kvm.kvm import KvmMmuNotifier
    for sub in list(mm.notifiers):
        if isinstance(sub, KvmMmuNotifier):
            yield from sub.kvm.mmu_lock.write_lock.steps()
            sub.kvm.mmu_lock.write_unlock()           # the notifier's own hold follows at once
    young = mm.clear_young(start, end)
    yield f"mmu_notifier_clear_young: {'young' if young else 'old'}"
    return young


def _fault_munmap_dirty_log(policy, mutations, arch, *, aging: bool) -> World:
    w = _world(policy, mutations, arch, VmaKind.ANON, KVM_MEM.LOG_DIRTY_PAGES)
    w.host.mm.host_access(w.vma.start, True, 1)
    w.threads = {"vcpu0": w.kvm.arch.page_fault.steps(w.vcpu, GPA, write=True),
                 "host": w.host.mm.munmap.steps(w.vma.start, PAGE_SIZE),
                 "dirtylog": kvm_vm_ioctl_get_dirty_log.steps(w.kvm, 0)}
    if aging:
        w.threads["aging"] = mmu_notifier_clear_young.steps(w.host.mm, w.vma.start, w.vma.start + PAGE_SIZE)
    return w


def _fault_munmap_dirtylog(policy, mutations, arch) -> World:
    """A vCPU write fault on a dirty-logged anon page, munmap of that page and ``KVM_GET_DIRTY_LOG``."""
    return _fault_munmap_dirty_log(policy, mutations, arch, aging=False)


def _fault_munmap_dirtylog_aging(policy, mutations, arch) -> World:
    """The same three paths plus page aging (``clear_young``) of that page: four threads."""
    return _fault_munmap_dirty_log(policy, mutations, arch, aging=True)


@kpath
def _vcpu_map_access(vcpu, gfn: int) -> Steps:
    """Nested virtualization's direct access (``nested_get_vmcs12_pages()`` style): ``kvm_vcpu_map()``,
    a preemption point, a store through the kernel mapping, ``kvm_vcpu_unmap(dirty=true)``."""
    from kvmsim.errors import ModelError
    from kvmsim.kvm.host_map import kvm_vcpu_map, kvm_vcpu_map_access, kvm_vcpu_unmap
    try:
        m = kvm_vcpu_map(vcpu, gfn)
    except ModelError as e:
        yield f"kvm_vcpu_map: fails ({e})"
        return False
    yield "kvm_vcpu_map: mapped"
    kvm_vcpu_map_access(m, True, 3)
    yield "kvm_host_map: KVM stores through the mapping"
    kvm_vcpu_unmap(vcpu, m, dirty=True)
    yield "kvm_vcpu_unmap"
    return True


def _pfncache_invalidate_vcpu_map(policy, mutations, arch) -> World:
    """A pfncache refresh, munmap's invalidation of that page, and a ``kvm_vcpu_map()`` user of the
    same gfn: three threads; then KVM writes through the cache."""
    w = _pfncache_vs_munmap(policy, mutations, arch)
    w.threads["map"] = _vcpu_map_access.steps(w.vcpu, GPA >> 12)
    return w


def _sync_marks(v) -> bool:
    return v.invariant in ("INV-2", "INV-12") and v.objects.get("caller") == "mmu_spte_update"


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
    Scenario("private-fault-vs-punch-hole", "x86 private (guest_memfd) write fault races fallocate(PUNCH_HOLE): "
             "v6.12 ages the retried, unused folio (the hole's invalidation made the fault stale)",
             _private_fault_vs_punch_hole, _invs("INV-5", "INV-7"), arches=("x86",), arch="x86"),
    Scenario("shadow-sync-vs-munmap", "x86 shadow paging: INVLPG's FNAME(sync_spte) of a CoW'd gPTE races munmap; "
             "v6.12 marks the folio from the SPTE when the sync wins", _shadow_sync_vs_munmap, _sync_marks,
             arches=("x86",), arch="x86"),
    Scenario("tlbwe-vs-truncate", "e500 tlbwe premap races truncate: v6.12 ages the retried, unused page after unlock",
             _tlbwe_vs_truncate, _invs("INV-5", "INV-7"), arches=("ppc-e500",), arch="ppc-e500"),
    Scenario("fault-munmap-dirtylog", "3 threads: vCPU write fault on a dirty-logged page, munmap of it, "
             "KVM_GET_DIRTY_LOG", _fault_munmap_dirtylog, _invs("INV-5", "INV-6", "INV-12")),
    Scenario("fault-munmap-dirtylog-aging", "4 threads: vCPU write fault on a dirty-logged page, munmap of it, "
             "KVM_GET_DIRTY_LOG, page aging (clear_young)", _fault_munmap_dirtylog_aging,
             _invs("INV-5", "INV-6", "INV-12")),
    Scenario("pfncache-invalidate-vcpu-map", "3 threads: pfncache refresh, munmap's invalidation, kvm_vcpu_map() "
             "of the same gfn; then KVM writes through the cache", _pfncache_invalidate_vcpu_map,
             _invs("INV-5", "INV-6"), _pfncache_final),
    Scenario("apic-access-reload-vs-migrate", "VMX vmx_set_apic_access_page_addr() races a migration of the "
             "APIC-access page; v6.12 releases it after read_unlock()", _apic_reload_vs_migrate,
             lambda v: v.invariant in ("INV-3", "INV-5") and "vmx_set_apic_access_page_addr" in v.detail,
             _apic_final, arches=("x86",), arch="x86"),
)}
