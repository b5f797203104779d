"""The PowerPC e500 shadow TLB (arch/powerpc/kvm/e500_mmu_host.c, e500_mmu.c, e500.h; Linux v6.12, v6.13-rc1
and v6.13).

An e500 guest (KVM_E500V2 / KVM_E500MC) manages its own software-loaded TLB: ``tlbwe`` writes a guest
TLB0 (4 KiB, set-associative) or TLB1 (variable size) entry whose MAS3 carries the user/supervisor
R/W/X permissions (:class:`MAS3`).  KVM keeps a ``struct tlbe_ref`` per guest entry (the shadow
reference: ``pfn``, ``E500_TLB_VALID`` and, from v6.13-rc7, ``E500_TLB_WRITABLE``) and writes a shadow
entry into the host TLB.  ``kvmppc_e500_emul_tlbwe()`` premaps the new entry and a guest DTLB/ITLB
miss on an entry the guest has calls ``kvmppc_mmu_map()``; both end in ``kvmppc_e500_shadow_map()``,
which is the shared stage-2 template (:func:`kvmsim.kvm.fault.kvm_stage2_fault`) with the hooks below:
``mmu_seq`` snapshot, the pfn (``fault_pfn_lookup``, the resolved ``kvm.ops.arch_ops.faultin``: the protocol decides how),
``spin_lock(&kvm->mmu_lock)`` (a spinlock: the model's write side), ``mmu_invalidate_retry(kvm,
mmu_seq)`` for the whole VM (-EAGAIN), ``find_linux_pte()`` (the host PTE from the mm model's
:meth:`~kvmsim.mm.mm.Mm.pte_of`: present or -EINVAL, and its page size), ``kvmppc_e500_ref_setup()`` and
``kvmppc_e500_setup_stlbe()``, then the release.  The three protocols (their functions are in
:mod:`kvmsim.ppc.e500_versions`)::

    v6.12                               | v6.13-rc1 .. rc6 ("series-rc1")       | v6.13 ("series")
    mmu_seq = kvm->mmu_invalidate_seq   | (same)                                | (same)
    if (tlbsel == 1) VM_PFNMAP vma:     | (same: no reference, no VM_WRITE)     | (gone: 55f4db79c4d9)
      pfn = vm_pgoff + ..., tsize fit   |                                       |
    else pfn = gfn_to_pfn_memslot()     | __kvm_faultin_pfn(.., FOLL_WRITE,     | __kvm_faultin_pfn(.., FOLL_WRITE,
      (writable: NULL, not asked)       |   NULL, &page): WARN, ERR_FAULT       |   &writable, &page)
    error pfn: return -EINVAL           | (every non-PFNMAP map ends here)      | (same)
    spin_lock; retry: -EAGAIN           | (same)                                | (same)
    find_linux_pte: !present: -EINVAL   | (same)                                | (same) + psize: TLB1 tsize fit
    ref_setup: set_pfn_accessed,        | writable = tlbe_is_writable(gtlbe)    | ref_setup(.., writable): E500_TLB_WRITABLE
      set_pfn_dirty iff gtlbe writable  |                                       | writable = tlbe_is_writable(stlbe)
    spin_unlock; release_pfn_clean(pfn) | release_faultin_page(page, !!ret,     | release_faultin_page(page, !!ret,
                                        |   writable); spin_unlock              |   writable); spin_unlock

The guest TLB is per vCPU, as the kernel's ``vcpu_e500->gtlb_arch`` is (a ``tlbwe`` on one vCPU is not
seen by another's miss; a shadow flush clears every vCPU's references).  Model shortcuts: a guest
access names a guest physical address and finds the guest TLB entry whose real address covers it (the guest's effective
address is that entry's ``eaddr``); an access no guest entry covers is handled by the guest's own TLB
miss handler, modelled as a ``tlbwe`` of a 4 KiB TLB0 entry with every permission.  The shadow entry is
kept as stage-2 leaves (:class:`~kvmsim.kvm.stage2.GenericStage2`'s arrays, one per 4 KiB of the shadow
entry) written under ``mmu_lock``: the kernel writes the host TLB after the unlock, and an mmu_notifier
invalidation in between only requests KVM_REQ_TLB_FLUSH, served before the guest runs again, so the
observable order is the same.  The leaf's Host-writable bit is what ``find_linux_pte()``'s PTE says, so
a guest-writable shadow entry over a read-only host PTE breaks INV-11.  Not modelled: the magic page,
the TLB1 host-entry bitmaps beyond their flags, guest address spaces (TS/TID), WIMGE, icache flushes,
the mmap_lock around the v6.12 VMA lookup, dirty logging (booke has none), and mmu_notifier aging
(``kvm_age_gfn()`` returns false).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntFlag

import numpy as np

from kvmsim.kvm.fault import FaultRet, KvmPageFault, kvm_guest_access, kvm_stage2_fault
from kvmsim.kvm.pfn import Hold, KvmFollowPfn
from kvmsim.kvm.stage2 import S2, GenericStage2
from kvmsim.kvm.vcpu import Access, Exit
from kvmsim.mm.gup import FOLL
from kvmsim.mm.vma import VM, Pte
from kvmsim.sched import Steps, kpath
from kvmsim.types import LEVEL_PAGES, PAGE_SHIFT

_P, _W, _HW, _A, _D, _H = (int(f) for f in (S2.PRESENT, S2.W, S2.HOST_W, S2.A, S2.D, S2.HELD))
EINVAL, EAGAIN = -errno.EINVAL, -errno.EAGAIN

#: ``BOOK3E_PAGESZ_4K``: MAS1 TSIZE encodes 2^tsize KiB.
BOOK3E_PAGESZ_4K = 2
#: The guest TLB sizes KVM gives an e500 guest (``KVM_E500_TLB0_SIZE``, ``KVM_E500_TLB1_SIZE``).
KVM_E500_TLB0_SIZE = 512
KVM_E500_TLB1_SIZE = 64


class MAS3(IntFlag):
    """MAS3 permission bits (arch/powerpc/include/asm/mmu-book3e.h)."""

    SR = 0x01
    UR = 0x02
    SW = 0x04
    UW = 0x08
    SX = 0x10
    UX = 0x20


MAS3_ALL = MAS3.SR | MAS3.UR | MAS3.SW | MAS3.UW | MAS3.SX | MAS3.UX


class E500_TLB(IntFlag):
    """``tlbe_ref.flags`` (arch/powerpc/kvm/e500.h); WRITABLE came with v6.13-rc7 (f2104bf22f04 "KVM: e500:
    track host-writability of pages")."""

    WRITABLE = 1 << 28
    TLB0 = 1 << 29
    BITMAP = 1 << 30
    VALID = 1 << 31


@dataclass(slots=True)
class TlbeRef:
    """Model of ``struct tlbe_ref``: the shadow reference of one guest TLB entry."""

    pfn: int = 0
    flags: E500_TLB = E500_TLB(0)


@dataclass(slots=True)
class Gtlbe:
    """Model of a guest ``struct kvm_book3e_206_tlb_entry`` with its ``tlbe_priv``: where it sits
    (``tlbsel``, ``esel``), MAS2 EPN (``eaddr``), MAS7_3 RPN (``raddr``), MAS1 TSIZE and MAS3."""

    tlbsel: int
    esel: int
    eaddr: int
    raddr: int
    tsize: int
    mas3: MAS3
    ref: TlbeRef = field(default_factory=TlbeRef)
    shadow: list = field(default_factory=list)        # (slot, lo, hi): the shadow entry's leaves

    @property
    def size(self) -> int:
        return 1 << (self.tsize + 10)


def tlbe_is_writable(mas3: int) -> bool:
    """``tlbe_is_writable()``: ``mas7_3 & (MAS3_SW|MAS3_UW)``."""
    return bool(mas3 & (MAS3.SW | MAS3.UW))


def e500_shadow_mas3_attrib(mas3: MAS3, writable: bool) -> MAS3:
    """``e500_shadow_mas3_attrib()``: v6.13-rc7 clears UW and SW when the host page is not writable
    (v6.12 had no ``writable`` argument: it is passed true there)."""
    return mas3 if writable else mas3 & ~(MAS3.UW | MAS3.SW)


def tsize_fit(tsize: int, gfn: int, pfn: int, start: int, end: int) -> tuple[int, int]:
    """The loop of ``kvmppc_e500_shadow_map()`` that finds "the largest tsize (up to what the guest
    requested) that will cover gfn, stay within the range, and for which gfn and pfn are mutually
    aligned" (v6.12 over the VM_PFNMAP range, v6.13 over the host PTE's psize): (tsize, aligned pfn)."""
    tsize = max(BOOK3E_PAGESZ_4K, tsize & ~1)         # "e500 doesn't implement the lowest tsize bit"
    while tsize > BOOK3E_PAGESZ_4K:
        n = 1 << (tsize - 2)
        gfn_start = gfn & ~(n - 1)
        if gfn_start + pfn - gfn >= start and gfn_start + n + pfn - gfn <= end and (gfn & (n - 1)) == (pfn & (n - 1)):
            return tsize, pfn & ~(n - 1)
        tsize -= 2
    return BOOK3E_PAGESZ_4K, pfn


def vm_pgoff_pfn(vma) -> int:
    """``vma->vm_pgoff`` as the v6.12 TLB1 path reads it: the first pfn of a physically contiguous
    VM_PFNMAP region (/dev/mem's convention).  The model's driver VMAs give the offset into the driver's
    pfns, so the model maps it to that pfn."""
    return int(vma.driver.pfns[vma.pgoff]) if vma.driver is not None else vma.pgoff


@dataclass(slots=True)
class E500PageFault(KvmPageFault):
    """The template's fault plus what ``kvmppc_e500_shadow_map()`` carries: the guest entry, ``tlbsel``,
    ``gvaddr``, ``hva`` and ``tsize`` (None: size it from ``find_linux_pte()``'s psize under the lock)."""

    gtlbe: Gtlbe | None = None
    tlbsel: int = 0
    gvaddr: int = 0
    hva: int = 0
    tsize: int | None = BOOK3E_PAGESZ_4K


def shadow_map_error_pfn(kvm):
    """``if (is_error_noslot_pfn(pfn)) { pr_err("%s: real page not found for gfn %lx\\n"); return -EINVAL; }``"""
    def handle(pfn: int) -> int:
        kvm.journal.count("kvm_err:real page not found")
        return EINVAL
    return handle


class E500Mmu(GenericStage2):
    """The e500 MMU: the guest TLB (:class:`Gtlbe`) and its shadow entries (stage-2 leaves)."""

    name = "ppc-e500"

    def __init__(self, kvm, **opts):
        super().__init__(kvm, **opts)
        #: Each vCPU's guest TLB (``struct kvmppc_vcpu_e500``'s ``gtlb_arch``): vcpu_id → (tlbsel, esel) → entry.
        self.vcpu_gtlb: dict[int, dict[tuple[int, int], Gtlbe]] = {}
        self.handle_error_pfn = shadow_map_error_pfn(kvm)

    # ---- the fault template's hooks (kvmsim.kvm.fault) -----------------------------------------
    family = "ppc-e500"
    fault_labels = ("kvmppc_e500_shadow_map: mmu_seq snapshot", "kvmppc_e500_shadow_map: pfn resolved",
                    "kvmppc_e500_shadow_map: spin_unlock(mmu_lock)")
    fault_lock_read = False           # spin_lock(&kvm->mmu_lock)
    fault_faultin_nowait = False      # one lookup, no lockless pre-check
    fault_logging_write_only = False
    fault_retry_ret = EAGAIN          # if (mmu_invalidate_retry(kvm, mmu_seq)) { ret = -EAGAIN; goto out; }
    fault_retry_per_gfn = False       # mmu_invalidate_retry(): the whole VM
    fault_stale_invalid_slot = False
    fault_after_unlock = None

    def fault_pfn_lookup(self, fault: E500PageFault):
        """The shadow map's pfn lookup, which each protocol does its own way: the resolved
        ``kvm.ops.arch_ops.faultin`` (:mod:`kvmsim.ppc.e500_versions`)."""
        return self.kvm.ops.arch_ops.faultin(self.kvm, self, fault)

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_release_faultin_page(kvm, page, !!ret, writable)``: any error (retry, PTE gone) is unused."""
        return fault.ret != 0

    def fault_map(self, fault: E500PageFault) -> int:
        """Under ``mmu_lock`` after the retry check: ``find_linux_pte()``, the TLB1 size from its psize
        (v6.13), ``kvmppc_e500_ref_setup()`` (v6.12 marks the page there: the resolved
        ``fault_dirty_before_map``), ``kvmppc_e500_setup_stlbe()``, ``writable = tlbe_is_writable(stlbe)``."""
        kvm = self.kvm
        vma, _, pte, level = kvm.mm.pte_of(fault.hva)               # find_linux_pte(pgdir, hva, NULL, &psize)
        if vma is not None and not pte & Pte.PRESENT:
            kvm.journal.count("kvm_err:pte not present")
            fault.ret = EINVAL
            return EINVAL
        if fault.tsize is None:
            fault.tsize = self.kvmppc_e500_psize_tsize(fault, LEVEL_PAGES[level] if level > 1 else 0)
        npages = 1 << (fault.tsize - 2)
        fault.pfn &= ~(npages - 1)                                   # "Align guest and physical address"
        fault.gvaddr &= ~((npages << PAGE_SHIFT) - 1)
        gtlbe = fault.gtlbe
        before = kvm.ops.fault_dirty_before_map
        if before is not None:
            with kvm.journal.fault_release():
                before(kvm, fault)
        self.kvmppc_e500_ref_setup(gtlbe.ref, fault.pfn, fault.map_writable)
        writable = tlbe_is_writable(self.kvmppc_e500_setup_stlbe(gtlbe))
        fault.map_writable = writable                                # the dirty witness of the release
        self.write_stlbe(fault, npages, writable, host_writable=bool(pte & Pte.WRITE),
                         held=fault.kfp.hold != Hold.NONE)
        fault.ret = 0
        return FaultRet.FIXED

    def kvmppc_e500_psize_tsize(self, fault: E500PageFault, psize_pages: int) -> int:
        """v6.13 (55f4db79c4d9 "KVM: e500: perform hugepage check after looking up the PFN"): ``if (psize &&
        tlbsel == 1)`` fit the guest's TSIZE into the host page that maps the pfn, clipped to the memslot."""
        if not psize_pages or fault.tlbsel != 1:
            return BOOK3E_PAGESZ_4K
        pfn, gfn, slot = fault.pfn, fault.gfn, fault.slot
        start = pfn & ~(psize_pages - 1)
        slot_start = pfn - (gfn - slot.base_gfn)
        start, end = max(start, slot_start), min(start + psize_pages, slot_start + slot.npages)
        tsize = min(psize_pages.bit_length() - 1 + BOOK3E_PAGESZ_4K, fault.gtlbe.tsize)
        tsize, fault.pfn = tsize_fit(tsize, gfn, pfn, start, end)
        return tsize

    def kvmppc_e500_tlb1_pfnmap(self, fault: E500PageFault) -> tuple[int, KvmFollowPfn] | None:
        """v6.12 and v6.13-rc1 ``kvmppc_e500_shadow_map()`` for TLB1 (under mmap_read_lock): a VM_PFNMAP
        VMA ("a physically contiguous region (e.g. /dev/mem) that bypasses normal Linux page management")
        gives ``pfn = vm_pgoff + offset`` with no reference and no look at VM_WRITE, sized by
        :func:`tsize_fit`; a hugetlb VMA only caps TSIZE.  None: take the pfn from the common lookup."""
        if fault.tlbsel != 1:
            return None
        vma = self.kvm.mm.vma_lookup(fault.hva)
        if vma is not None and vma.flags & VM.PFNMAP:
            slot, gfn = fault.slot, fault.gfn
            start = vm_pgoff_pfn(vma)
            pfn = start + ((fault.hva - vma.start) >> PAGE_SHIFT)
            slot_start = pfn - (gfn - slot.base_gfn)
            lo, hi = max(start, slot_start), min(start + vma.npages, slot_start + slot.npages)
            fault.tsize, pfn = tsize_fit(fault.gtlbe.tsize, gfn, pfn, lo, hi)
            kfp = KvmFollowPfn(slot, gfn, flags=FOLL.WRITE, hva=fault.hva, caller="kvmppc_e500_shadow_map")
            kfp.remapped, kfp.map_writable = True, True     # host permissions ignored
            self.kvm.journal.count("kvmppc_e500_tlb1_pfnmap")
            return pfn, kfp
        if vma is not None and vma.flags & VM.HUGETLB:
            tsize = min(vma.page_size.bit_length() - 1 - 10, fault.gtlbe.tsize)
            fault.tsize = max(BOOK3E_PAGESZ_4K, tsize & ~1)
        return None

    # ---- tlbe_ref and the shadow entry ------------------------------------------------------------
    @staticmethod
    def kvmppc_e500_ref_setup(ref: TlbeRef, pfn: int, writable: bool) -> None:
        """Mirrors ``kvmppc_e500_ref_setup()``'s reference part (v6.12 and v6.13): ``ref->pfn = pfn;
        ref->flags = E500_TLB_VALID`` (+ ``E500_TLB_WRITABLE`` if ``writable``, v6.13-rc7).  v6.12's page
        marking there is :func:`kvmsim.ppc.e500_versions.kvmppc_e500_ref_setup_v612`."""
        ref.pfn = pfn
        ref.flags = E500_TLB.VALID | (E500_TLB.WRITABLE if writable else E500_TLB(0))

    @staticmethod
    def kvmppc_e500_ref_release(ref: TlbeRef) -> None:
        """Mirrors ``kvmppc_e500_ref_release()``: ``ref->flags = 0`` (no page is touched: the shadow
        entry holds no reference in either version)."""
        ref.flags = E500_TLB(0)

    @staticmethod
    def kvmppc_e500_setup_stlbe(gtlbe: Gtlbe) -> MAS3:
        """Mirrors ``kvmppc_e500_setup_stlbe()``: the shadow entry's MAS3 from the guest's, through
        :func:`e500_shadow_mas3_attrib` with ``E500_TLB_WRITABLE``."""
        ref = gtlbe.ref
        assert ref.flags & E500_TLB.VALID                       # BUG_ON(!(ref->flags & E500_TLB_VALID))
        return e500_shadow_mas3_attrib(gtlbe.mas3, bool(ref.flags & E500_TLB.WRITABLE))

    def write_stlbe(self, fault: E500PageFault, npages: int, writable: bool, *, host_writable: bool,
                    held: bool) -> None:
        """``write_stlbe()``: the shadow entry as leaves, one per 4 KiB it covers inside the memslot."""
        kvm, slot, gtlbe = self.kvm, fault.slot, fault.gtlbe
        pfns, bits = self._tables(slot)
        first = fault.gfn & ~(npages - 1)
        lo, hi = max(first, slot.base_gfn) - slot.base_gfn, min(first + npages, slot.base_gfn + slot.npages) - slot.base_gfn
        b = _P | _A | (_W | _D if writable else 0) | (_HW if host_writable else 0) | (_H if held else 0)
        pfns[lo:hi] = fault.pfn + (np.arange(lo, hi) + slot.base_gfn - first)
        bits[lo:hi] = b
        gtlbe.shadow.append((slot, lo, hi))
        if fault.tlbsel == 1:
            gtlbe.ref.flags |= E500_TLB.TLB0 if npages == 1 else E500_TLB.BITMAP
        kvm.journal.count("spte_write")
        kvm.journal.fact("spte_set", pfn=fault.pfn, gfn=fault.gfn, kvm=True, caller="write_stlbe",
                         locked=kvm.mmu_lock.held(), extra={"writable": writable, "host_writable": host_writable,
                                                            "tlbsel": fault.tlbsel, "tsize": fault.tsize})

    def inval_gtlbe_on_host(self, gtlbe: Gtlbe) -> None:
        """Mirrors ``inval_gtlbe_on_host()``: the entry's shadow leaves go, ``ref->flags = 0``."""
        for slot, lo, hi in gtlbe.shadow:
            self._zap(slot, lo, hi, "inval_gtlbe_on_host")
        gtlbe.shadow.clear()
        gtlbe.ref.flags = E500_TLB(0)

    # ---- the paths in --------------------------------------------------------------------------
    @kpath
    def kvmppc_e500_shadow_map(self, vcpu, gvaddr: int, gfn: int, gtlbe: Gtlbe) -> Steps:
        """Mirrors ``kvmppc_e500_shadow_map()`` (arch/powerpc/kvm/e500_mmu_host.c, v6.12, v6.13-rc1 and
        v6.13): the template with the hooks above.  Returns 0, -EAGAIN (retry) or -EINVAL."""
        slot = self.kvm.gfn_to_memslot(gfn)               # "gfn_to_memslot() must succeed"
        hva = slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT)
        fault = E500PageFault(vcpu, gfn, slot, True, gtlbe=gtlbe, tlbsel=gtlbe.tlbsel, gvaddr=gvaddr, hva=hva)
        r = yield from kvm_stage2_fault.steps(self, fault)
        return int(r) if r < 0 else fault.ret

    @kpath
    def kvmppc_mmu_map(self, vcpu, gtlbe: Gtlbe, gpaddr: int) -> Steps:
        """Mirrors ``kvmppc_mmu_map()``: TLB0 re-writes a still-valid shadow reference
        (``kvmppc_e500_setup_stlbe()`` from ``priv->ref``) or maps it (``kvmppc_e500_tlb0_map()``); TLB1
        maps the faulting page (``kvmppc_e500_tlb1_map()``).  The kernel ignores the result; the model
        returns the shadow map's."""
        if gtlbe.tlbsel == 0 and gtlbe.ref.flags & E500_TLB.VALID:
            self.kvm.journal.count("kvmppc_mmu_map_ref_valid")
            yield "kvmppc_mmu_map: shadow reference still valid"
            return 0
        if gtlbe.tlbsel == 0:
            r = yield from self.kvmppc_e500_shadow_map.steps(vcpu, gtlbe.eaddr, gtlbe.raddr >> PAGE_SHIFT, gtlbe)
        else:
            eaddr = gtlbe.eaddr + (gpaddr - gtlbe.raddr)
            r = yield from self.kvmppc_e500_shadow_map.steps(vcpu, eaddr, gpaddr >> PAGE_SHIFT, gtlbe)
        return r

    def tlbe_is_host_safe(self, gtlbe: Gtlbe) -> bool:
        """``tlbe_is_host_safe()`` (e500_mmu.c): the real address is in a memslot ("Mapping is not for RAM")."""
        return self.kvm.gfn_to_memslot(gtlbe.raddr >> PAGE_SHIFT) is not None

    @kpath
    def kvmppc_e500_emul_tlbwe(self, vcpu, tlbsel: int, esel: int, eaddr: int, raddr: int, tsize: int,
                               mas3: MAS3) -> Steps:
        """Mirrors ``kvmppc_e500_emul_tlbwe()`` (e500_mmu.c): ``kvmppc_e500_gtlbe_invalidate()`` of the
        entry being overwritten, the new entry (TLB0 forced to 4 KiB), and "Premap the faulting page"
        (``kvmppc_mmu_map()``) when it is host safe.  Returns the premap's result (0 when none)."""
        limit = KVM_E500_TLB0_SIZE if tlbsel == 0 else KVM_E500_TLB1_SIZE
        if tlbsel not in (0, 1) or not 0 <= esel < limit:
            from kvmsim.errors import ModelError
            raise ModelError(errno.EINVAL, f"tlbwe: no TLB{tlbsel} entry {esel} (TLB0 has {KVM_E500_TLB0_SIZE} "
                                           f"entries, TLB1 {KVM_E500_TLB1_SIZE})")
        gtlb = self.gtlb(vcpu)
        old = gtlb.get((tlbsel, esel))
        if old is not None:
            self.inval_gtlbe_on_host(old)                    # kvmppc_e500_gtlbe_invalidate()
        size = BOOK3E_PAGESZ_4K if tlbsel == 0 else tsize
        mask = (1 << (size + 10)) - 1
        gtlbe = Gtlbe(tlbsel, esel, eaddr & ~mask, raddr & ~mask, size, MAS3(mas3))
        gtlb[(tlbsel, esel)] = gtlbe
        self.kvm.journal.count("tlbwe")
        if not self.tlbe_is_host_safe(gtlbe):
            yield "kvmppc_e500_emul_tlbwe: not RAM, no premap"
            return 0
        r = yield from self.kvmppc_mmu_map.steps(vcpu, gtlbe, gtlbe.raddr)   # get_tlb_raddr(gtlbe)
        return r

    def gtlb(self, vcpu) -> dict[tuple[int, int], Gtlbe]:
        """``vcpu``'s guest TLB, (tlbsel, esel) → entry (empty until its first ``tlbwe``)."""
        return self.vcpu_gtlb.setdefault(vcpu.vcpu_id, {})

    def kvmppc_e500_tlb_search(self, vcpu, gpa: int) -> Gtlbe | None:
        """``vcpu``'s guest entry whose real address covers ``gpa`` (TLB1 first, as
        ``kvmppc_e500_tlb_search()`` takes the first match; the model searches by real address, see the
        module docstring)."""
        for (tlbsel, _), g in sorted(self.gtlb(vcpu).items(), key=lambda kv: -kv[0][0]):
            if g.raddr <= gpa < g.raddr + g.size:
                return g
        return None

    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """``kvmppc_handle_exit()`` for a DTLB/ITLB miss: no memslot is MMIO (``kvmppc_emulate_mmio()``);
        a guest entry covering the address gets ``kvmppc_mmu_map()``; none: the guest's own miss handler
        writes a TLB0 entry (``tlbwe``, which premaps).  ``kvmppc_mmu_map()`` returns nothing, so a failed
        shadow map is RETRY: the guest re-executes the access and misses again."""
        kvm = self.kvm
        slot = kvm.gfn_to_memslot(gpa >> PAGE_SHIFT)
        kvm.journal.count("page_fault")
        if slot is None:
            return FaultRet.EMULATE
        if slot.invalid:
            return FaultRet.RETRY
        gtlbe = self.kvmppc_e500_tlb_search(vcpu, gpa)
        if gtlbe is None:
            base = gpa & ~((1 << PAGE_SHIFT) - 1)
            r = yield from self.kvmppc_e500_emul_tlbwe.steps(vcpu, 0, (gpa >> PAGE_SHIFT) % KVM_E500_TLB0_SIZE,
                                                              base, base, BOOK3E_PAGESZ_4K, MAS3_ALL)
        else:
            r = yield from self.kvmppc_mmu_map.steps(vcpu, gtlbe, gpa)
        if r or (write and not self._leaf_allows(vcpu, slot, (gpa >> PAGE_SHIFT) - slot.base_gfn, True)):
            kvm.journal.count("fault_retry" if r == EAGAIN else "kvmppc_mmu_map_no_shadow")
            return FaultRet.RETRY
        return FaultRet.FIXED

    def guest_access(self, vcpu, gpa: int, write: bool, value: int | None) -> Access:
        """A guest load/store: a store through a guest entry without SW/UW is the guest's own data
        storage interrupt (``kvmppc_core_queue_data_storage()``: :attr:`Exit.EXCEPTION`); everything else
        is :func:`kvmsim.kvm.fault.kvm_guest_access` over :meth:`page_fault`."""
        gtlbe = self.kvmppc_e500_tlb_search(vcpu, gpa)
        if gtlbe is not None and write and not tlbe_is_writable(gtlbe.mas3):
            self.kvm.journal.count("guest_dsi")
            return Access(Exit.EXCEPTION, gpa, write, value)
        return kvm_guest_access(self, vcpu, gpa, write, value)

    def _leaf_allows(self, vcpu, slot, i: int, write: bool) -> bool:
        """A present shadow leaf lets a load through, and a store if the shadow MAS3 has SW/UW (no
        fast path: anything else is a TLB miss or a storage interrupt)."""
        _, bits = self._tables(slot)
        b = int(bits[i])
        if b & _P and (not write or b & _W):
            bits[i] |= _A | (_D if write else 0)
            return True
        return False

    # ---- mmu_notifier and memslots ---------------------------------------------------------------
    def _leaf_zapped(self, pfn: int, bits: int, caller: str, gfn: int) -> None:
        """Dropping a shadow entry touches no page in either version."""

    def unmap_gfn_range(self, slot, start: int, end: int, reason: str = "") -> bool:
        """``kvm_unmap_gfn_range()`` → ``kvm_e500_mmu_unmap_gfn()``: "Flush all shadow tlb entries
        everywhere" (returns true; the flush is ``kvmppc_core_flush_tlb()``: every shadow entry goes and
        ``clear_tlb_privs()`` releases every reference)."""
        self.kvmppc_core_flush_tlb()
        return True

    def kvmppc_core_flush_tlb(self) -> None:
        """Mirrors ``kvmppc_core_flush_tlb()`` (``kvm_flush_remote_tlbs()``: every vCPU's
        ``kvmppc_e500_tlbil_all()`` + ``clear_tlb_privs()``)."""
        for gtlb in self.vcpu_gtlb.values():
            for gtlbe in gtlb.values():
                self.inval_gtlbe_on_host(gtlbe)
        for slots in self.kvm.memslots:
            for s in slots:
                self._zap(s, 0, s.npages, "kvmppc_e500_tlbil_all")

    def age_gfn(self, slot, start: int, end: int) -> bool:
        """``kvm_age_gfn()``: "XXX could be more clever ;)" -- false."""
        return False

    def test_age_gfn(self, slot, start: int, end: int) -> bool:
        """``kvm_test_age_gfn()``: false."""
        return False

    def flush_shadow_all(self) -> None:
        self.kvmppc_core_flush_tlb()

    def flush_shadow_memslot(self, slot) -> None:
        """booke's ``kvmppc_core_flush_memslot()`` is empty; the model drops every shadow entry instead,
        so no guest entry keeps a deleted slot's pfn (not a protocol difference)."""
        self.kvmppc_core_flush_tlb()
