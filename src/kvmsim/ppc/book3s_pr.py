"""PowerPC Book3S PR: the guest runs in problem state and KVM shadows its HPTEs
(arch/powerpc/kvm/book3s_pr.c, book3s.c, book3s_64_mmu_host.c, book3s_mmu_hpte.c; Linux v6.12 and v6.13).

Mirrors ``kvmppc_handle_pagefault()`` (the part that maps a visible gpa), ``kvmppc_gpa_to_pfn()``
with its magic page, ``kvmppc_mmu_map_page()`` of a 64-bit host on the template
(:func:`kvmsim.kvm.fault.kvm_stage2_fault`), the HPTE cache (``kvmppc_mmu_hpte_cache_next()``,
``kvmppc_mmu_hpte_cache_map()``, ``kvmppc_mmu_pte_flush_all()``) and ``kvmppc_patch_dcbz()``.  A
32-bit host maps without ``mmu_lock`` and without a retry check: :mod:`kvmsim.ppc.book3s_32_mmu_host`.

``kvmppc_mmu_map_page()`` on a 64-bit host, v6.12::

    mmu_seq = kvm->mmu_invalidate_seq;
    pfn = kvmppc_gpa_to_pfn(vcpu, orig_pte->raddr, iswrite, &writable);   /* gfn_to_pfn_prot() */
    ...
    kvm_set_pfn_accessed(pfn);
    if (!orig_pte->may_write || !writable)
        rflags |= PP_RXRX;
    else {
        mark_page_dirty(vcpu->kvm, gfn);
        kvm_set_pfn_dirty(pfn);
    }
    cpte = kvmppc_mmu_hpte_cache_next(vcpu);
    spin_lock(&kvm->mmu_lock);
    if (!cpte || mmu_invalidate_retry(kvm, mmu_seq)) { r = -EAGAIN; goto out_unlock; }
    ... hpte_insert(), kvmppc_mmu_hpte_cache_map() ...
    out_unlock:
    spin_unlock(&kvm->mmu_lock);
    kvm_release_pfn_clean(pfn);

The page is marked accessed and dirty before the lock and before the retry check (INV-3), and
accessed a second time after the unlock.  Patch 63 "KVM: PPC: Book3S: Mark "struct page" pfns
dirty/accessed after installing PTE" and patch 64 "KVM: PPC: Use kvm_faultin_pfn() to handle page
faults on Book3s PR" made it ``kvmppc_gpa_to_pfn(..., &writable, &page)`` (``kvm_faultin_pfn()``)
and ``kvm_release_faultin_page(kvm, page, false /* FIXME */, orig_pte->may_write && writable)``
before ``spin_unlock()``: marked once, under the lock, but also on -EAGAIN (``unused`` is always
false, the FIXME INV-7 lists as an exception).  ``mark_page_dirty()`` stays before the lock in both.

The magic page (``KVM_HC_PPC_MAP_MAGIC_PAGE``): a gpa the guest chose is served by the vCPU's
kernel-allocated shared page, ``get_page()`` taken by ``kvmppc_gpa_to_pfn()`` in both versions and
released like any faulted-in page.

The guest's own page table is not modelled: a fault maps gpa = ea, with the guest PTE's
``may_write`` true unless the ``ppc_guest_pte`` op cleared it.  An error pfn is ``r = -EINVAL`` (the
kernel then resumes the guest, which faults again; the model reports the access as failed).
Not modelled: segments (``kvmppc_mmu_map_segment()``; its failure leaks the page in both versions,
kvm-semantics.md INV-1 (d)), ``hpte_insert()`` failures (-EIO), 64 KiB pages, icache flushes.
"""

from __future__ import annotations

import errno

import numpy as np

from kvmsim.errors import ModelError, UsageError
from kvmsim.kvm.fault import (RETRY_LIVELOCK_BOUND, FaultRet, KvmPageFault, _held_src, kvm_stage2_fault,
                              livelock_access, ret_to_access)
from kvmsim.kvm.pfn import Hold, KvmFollowPfn, _kvm_faultin_pfn, kvm_set_pfn_accessed, \
    kvm_set_pfn_dirty
from kvmsim.kvm.vcpu import Access, Exit
from kvmsim.mm.gup import FOLL
from kvmsim.kvm.stage2 import S2
from kvmsim.ppc.book3s import EAGAIN, Book3sMmu, get_page
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT

#: arch/powerpc/include/asm/kvm_book3s.h: shadow HPTEs cached per vCPU before a full flush
HPTEG_CACHE_NUM = 1 << 15
#: arch/powerpc/kvm/book3s_pr.c: ``dcbz`` and the reserved form KVM patches it into (bit 3 cleared)
INS_DCBZ = 0x7C0007EC
_DCBZ_MASK = 0xFF0007FF


def kvmppc_mmu_map_page_v612_marks(kvm, fault: KvmPageFault) -> None:
    """v6.12 ``kvmppc_mmu_map_page()`` (64-bit host), before ``spin_lock(&kvm->mmu_lock)`` and the
    ``mmu_invalidate_retry()`` check: ``kvm_set_pfn_accessed(pfn)``, and ``kvm_set_pfn_dirty(pfn)`` when
    the HPTE is writable (``orig_pte->may_write && writable``).  Removed by patch 63 "KVM: PPC: Book3S:
    Mark "struct page" pfns dirty/accessed after installing PTE"."""
    src = _held_src(fault.kfp)
    kvm_set_pfn_accessed(kvm, fault.pfn, "kvmppc_mmu_map_page", source=src, gfn=fault.gfn)
    if fault.map_writable:
        kvm_set_pfn_dirty(kvm, fault.pfn, "kvmppc_mmu_map_page", source=src, gfn=fault.gfn)


class Book3sPrMmu(Book3sMmu):
    """PowerPC Book3S PR on a 64-bit host (``host_bits=32``: :mod:`kvmsim.ppc.book3s_32_mmu_host`)."""

    name = "ppc-book3s-pr"
    family = "ppc-book3s-pr"
    fault_labels = ("kvmppc_mmu_map_page: mmu_seq snapshot", "kvmppc_mmu_map_page: pfn resolved",
                    "kvmppc_mmu_map_page: spin_unlock(mmu_lock)")
    fault_retry_ret = EAGAIN

    def __init__(self, kvm, *, host_bits: int = 64, **opts):
        super().__init__(kvm, **opts)
        if host_bits not in (32, 64):
            raise UsageError(f"host_bits must be 32 or 64 (a Book3S PR host), not {host_bits}")
        self.host_bits = host_bits
        #: ``vcpu3s->hpte_cache_count``: shadow HPTEs in the cache.
        self.hpte_cache_count = 0
        #: Model-only fault injection: the next n ``kmem_cache_zalloc(hpte_cache)`` calls fail.
        self.hpte_cache_alloc_failures = 0
        #: Per vCPU: ``vcpu->arch.magic_page_pa`` and the pfn of ``vcpu->arch.shared``.
        self.magic: dict[int, tuple[int, int]] = {}
        #: Per vCPU: the magic page's shadow HPTE (writable?), or absent.
        self.magic_leaf: dict[int, bool] = {}
        #: gfns whose guest PTE has ``may_write`` clear.
        self.guest_pte_ro: set[int] = set()

    # ---- the magic page (KVM_HC_PPC_MAP_MAGIC_PAGE) -----------------------------------------------
    def kvmppc_map_magic_page(self, vcpu, gpa: int) -> int:
        """``KVM_HC_PPC_MAP_MAGIC_PAGE``: ``vcpu->arch.magic_page_pa = param1 & ~0xfffULL``; the shared
        page itself was allocated at vCPU creation (``__get_free_page()``).  Returns its pfn."""
        phys = self.kvm.phys
        if vcpu.vcpu_id not in self.magic:
            pfn = phys.alloc(owner=phys.register_owner(f"vcpu{vcpu.vcpu_id}->arch.shared"))
        else:
            pfn = self.magic[vcpu.vcpu_id][1]
        self.magic[vcpu.vcpu_id] = (gpa & ~0xFFF, pfn)
        self.magic_leaf.pop(vcpu.vcpu_id, None)
        return pfn

    def _magic_pfn(self, vcpu, gpa: int) -> int | None:
        m = self.magic.get(vcpu.vcpu_id)
        return m[1] if m is not None and m[0] == gpa & ~0xFFF else None

    def kvmppc_gpa_to_pfn(self, vcpu, gpa: int, writing: bool) -> tuple[int, KvmFollowPfn]:
        """Mirrors ``kvmppc_gpa_to_pfn()`` (arch/powerpc/kvm/book3s.c): the magic page is the shared page,
        ``get_page()`` and writable; anything else ``gfn_to_pfn_prot(kvm, gfn, writing, writable)``
        (v6.12) / ``kvm_faultin_pfn(vcpu, gfn, writing, writable, page)`` (v6.13), one ``hva_to_pfn()``
        in the model."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        pfn = self._magic_pfn(vcpu, gpa)
        if pfn is not None:
            get_page(kvm, pfn, "kvmppc_gpa_to_pfn")
            kfp = KvmFollowPfn(None, gfn, caller="kvmppc_gpa_to_pfn", map_writable=True, held=pfn, hold=Hold.GET)
            kfp.refcounted_page = kvm.policy.reported_page(kfp)
            return pfn, kfp
        return _kvm_faultin_pfn(kvm, kvm.gfn_to_memslot(gfn), gfn, FOLL.WRITE if writing else FOLL(0),
                                caller="kvmppc_gpa_to_pfn")

    # ---- the HPTE cache (book3s_mmu_hpte.c) ---------------------------------------------------------
    def kvmppc_mmu_hpte_cache_next(self, vcpu) -> bool:
        """Mirrors ``kvmppc_mmu_hpte_cache_next()``: a full cache (``HPTEG_CACHE_NUM``) is flushed
        first (``kvmppc_mmu_pte_flush_all()``), then ``kmem_cache_zalloc()``, which can fail (NULL)."""
        if self.hpte_cache_count >= HPTEG_CACHE_NUM:
            self.kvmppc_mmu_pte_flush_all()
        if self.hpte_cache_alloc_failures:
            self.hpte_cache_alloc_failures -= 1
            self.kvm.journal.count("hpte_cache_alloc_failed")
            return False
        return True

    def kvmppc_mmu_pte_flush_all(self) -> None:
        """Mirrors ``kvmppc_mmu_pte_flush_all()``: every shadow HPTE invalidated (no page marked)."""
        self.kvm.journal.count("kvmppc_mmu_pte_flush_all")
        self.flush_shadow_all()

    def flush_shadow_all(self) -> None:
        super().flush_shadow_all()
        self.magic_leaf.clear()
        self.hpte_cache_count = 0

    def _zap(self, slot, lo: int, hi: int, reason: str) -> bool:
        """``kvmppc_mmu_pte_pflush()`` of the range: each shadow HPTE leaves the cache."""
        if "s2" in slot.arch:
            self.hpte_cache_count -= int(np.count_nonzero(self._tables(slot)[1][lo:hi] & int(S2.PRESENT)))
        return super()._zap(slot, lo, hi, reason)

    # ---- the fault ------------------------------------------------------------------------------
    def guest_access(self, vcpu, gpa: int, write: bool, value):
        """A guest load/store: the magic page through its shadow HPTE (faulting it in first), anything else
        as :func:`kvmsim.kvm.fault.kvm_guest_access` does."""
        pfn = self._magic_pfn(vcpu, gpa)
        if pfn is None:
            return super().guest_access(vcpu, gpa, write, value)
        phys = self.kvm.phys
        for _ in range(RETRY_LIVELOCK_BOUND):
            leaf = self.magic_leaf.get(vcpu.vcpu_id)
            if leaf is not None and (leaf or not write):
                if write:
                    phys.write(pfn, int(value or 0), "guest write", kvm=True)
                    return Access(Exit.OK, gpa, True, value)
                return Access(Exit.OK, gpa, False, phys.read(pfn, "guest read", kvm=True))
            out = ret_to_access(int(self.page_fault(vcpu, gpa, write)), gpa, write, value)
            if out is not None:
                return out
        return livelock_access(self.kvm, gpa, write, value)

    @kpath
    def page_fault(self, vcpu, gpa: int, write: bool, exec: bool = False) -> Steps:
        """Mirrors ``kvmppc_handle_pagefault()`` for a guest translation that succeeded: a gpa that is
        neither the magic page nor in a visible memslot (``kvmppc_visible_gpa()``) is emulated MMIO;
        otherwise ``kvmppc_mmu_map_page()`` (a 32-bit host's when ``host_bits=32``)."""
        kvm = self.kvm
        gfn = gpa >> PAGE_SHIFT
        kvm.journal.count("page_fault")
        slot = kvm.gfn_to_memslot(gfn)
        if self._magic_pfn(vcpu, gpa) is None and (slot is None or slot.invalid):
            kvm.journal.count("kvmppc_emulate_mmio")
            return FaultRet.EMULATE
        if self.host_bits == 32:
            from kvmsim.ppc.book3s_32_mmu_host import kvmppc_mmu_map_page_32
            r = yield from kvmppc_mmu_map_page_32.steps(self, vcpu, gpa, slot, write)
        else:
            r = yield from self.kvmppc_mmu_map_page.steps(vcpu, gpa, slot, write)
        return r

    @kpath
    def kvmppc_mmu_map_page(self, vcpu, gpa: int, slot, iswrite: bool) -> Steps:
        """Mirrors ``kvmppc_mmu_map_page()`` of a 64-bit host (book3s_64_mmu_host.c, v6.12 and v6.13):
        the template with the hooks below (module docstring).  Returns FIXED, RETRY (-EAGAIN: an
        invalidation, or no HPTE cache entry) or -EINVAL for an error pfn."""
        r = yield from kvm_stage2_fault.steps(self, KvmPageFault(vcpu, gpa >> PAGE_SHIFT, slot, iswrite))
        return r

    # ---- the fault template's hooks (kvmsim.kvm.fault) -----------------------------------------
    def fault_pfn_lookup(self, fault: KvmPageFault) -> tuple[int, KvmFollowPfn]:
        """``pfn = kvmppc_gpa_to_pfn(vcpu, orig_pte->raddr, iswrite, &writable[, &page])``."""
        return self.kvmppc_gpa_to_pfn(fault.vcpu, fault.gfn << PAGE_SHIFT, fault.write)

    def handle_error_pfn(self, pfn: int) -> int:
        """An error pfn is ``r = -EINVAL; goto out`` (nothing released)."""
        self.kvm.journal.count("kvmppc_mmu_map_page_no_pfn")
        return -errno.EINVAL

    def fault_before_lock(self, fault: KvmPageFault) -> None:
        """Between the faultin and ``spin_lock()``: the HPTE is writable iff ``orig_pte->may_write &&
        writable``; v6.12's marks (the resolved ``fault_dirty_before_map``); ``mark_page_dirty()`` of a
        writable HPTE (both versions); ``cpte = kvmppc_mmu_hpte_cache_next(vcpu)`` (NULL → -EAGAIN under
        the lock)."""
        kvm = self.kvm
        fault.map_writable = fault.map_writable and fault.gfn not in self.guest_pte_ro
        marks = kvm.ops.fault_dirty_before_map
        if marks is not None:
            with kvm.journal.fault_release():
                marks(kvm, fault)
        if fault.map_writable and fault.slot is not None:
            from kvmsim.kvm.dirty import mark_page_dirty_in_slot
            mark_page_dirty_in_slot(kvm, fault.slot, fault.gfn, fault.vcpu)        # mark_page_dirty()
        fault.ret = 0 if self.kvmppc_mmu_hpte_cache_next(fault.vcpu) else EAGAIN

    def fault_map(self, fault: KvmPageFault) -> int:
        """``if (!cpte) r = -EAGAIN``; else ``hpte_insert()`` and ``kvmppc_mmu_hpte_cache_map()``."""
        if fault.ret:
            fault.retry = True
            return FaultRet.RETRY
        self.kvmppc_mmu_hpte_cache_map(fault.vcpu, fault.slot, fault.gfn, fault.pfn, fault.map_writable,
                                       fault.kfp.held is not None)
        return FaultRet.FIXED

    def kvmppc_mmu_hpte_cache_map(self, vcpu, slot, gfn: int, pfn: int, writable: bool, held: bool) -> None:
        """The shadow HPTE in the hash table and ``kvmppc_mmu_hpte_cache_map()`` (``hpte_cache_count++``)."""
        self.hpte_cache_count += 1
        if slot is None:                                   # the magic page: no memslot behind it
            self.magic_leaf[vcpu.vcpu_id] = writable
            self.kvm.journal.count("spte_write")
            return
        self.book3s_install_leaf(slot, gfn, pfn, writable, held, "kvmppc_mmu_map_page")

    def fault_unused(self, fault: KvmPageFault) -> bool:
        """``kvm_release_faultin_page(kvm, page, false, ...)``: "FIXME: Don't unconditionally pass
        unused=false" (v6.13); v6.12 released every outcome clean."""
        return False


# ---- dcbz patching (book3s_pr.c) ---------------------------------------------------------------------

def _patched(word: int) -> int:
    """``if ((be32_to_cpu(page[i]) & 0xff0007ff) == INS_DCBZ) page[i] &= cpu_to_be32(0xfffffff7);`` on
    the page's content (one instruction word in the model)."""
    return word & 0xFFFFFFF7 if word & _DCBZ_MASK == INS_DCBZ else word


def kvmppc_patch_dcbz_v612(vcpu, gpa: int) -> None:
    """v6.12 ``kvmppc_patch_dcbz()``: ``hpage = gfn_to_page(kvm, gfn)`` (a reference), then an extra
    ``get_page(hpage)``, ``kmap_atomic()``, the patch, ``kunmap_atomic()`` and one ``put_page(hpage)``:
    every patched page keeps one reference forever (fixed by patch 73 "KVM: PPC: Remove extra get_page()
    to fix page refcount leak"), and the write dirties neither the page nor the gfn (patch 74 "KVM: PPC:
    Use kvm_vcpu_map() to map guest memory to patch dcbz instructions")."""
    from kvmsim.kvm.pfn import gfn_to_page
    from kvmsim.ppc.book3s import put_gfn_to_page
    kvm = vcpu.kvm
    hpage = gfn_to_page(kvm, gpa >> PAGE_SHIFT)
    if hpage is None:                                     # is_error_page(hpage)
        return
    get_page(kvm, hpage, "kvmppc_patch_dcbz")
    word = kvm.phys.read(hpage, "kvmppc_patch_dcbz", kvm=True)
    kvm.phys.write(hpage, _patched(word), "kvmppc_patch_dcbz", kvm=True)
    put_gfn_to_page(kvm, hpage, "kvmppc_patch_dcbz")


def kvmppc_patch_dcbz(vcpu, gpa: int) -> None:
    """v6.13 ``kvmppc_patch_dcbz()``: ``kvm_vcpu_map(vcpu, gfn, &map)`` (FOLL_PIN; remapped memory refused
    unless ``allow_unsafe_mappings``), the patch through ``map.hva``, ``kvm_vcpu_unmap()``: the gfn
    logged dirty, the page dirtied, accessed and unpinned (patch 73 "KVM: PPC: Remove extra get_page()
    to fix page refcount leak", patch 74 "KVM: PPC: Use kvm_vcpu_map() to map guest memory to patch dcbz
    instructions")."""
    from kvmsim.kvm.host_map import kvm_vcpu_map, kvm_vcpu_map_access, kvm_vcpu_unmap
    try:
        m = kvm_vcpu_map(vcpu, gpa >> PAGE_SHIFT)
    except ModelError:                                    # if (r) return;
        return
    kvm_vcpu_map_access(m, True, _patched(kvm_vcpu_map_access(m, False)))
    kvm_vcpu_unmap(vcpu, m)
