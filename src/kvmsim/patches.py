"""The 85 patches of "KVM: Stop grabbing references to PFNMAP'd pages" (v13, merged for v6.13 as
5cb1659f4120), one row each, and the bundled scenarios that demonstrate them.

A row is the patch's number and exact title (``docs/series-patches.md``), its kind judged in isolation
(:class:`Kind`: refactor, behaviour change, API change with an observable effect), the arch or area it
touches and the one-line difference legacy (v6.12) → series (v6.13).  The table follows
``reference/series-patch-map.md``.

The claim "scenario S demonstrates patch N" lives next to the demonstration: a bundled scenario file
declares ``patches = [N, ...]`` in its header, and :func:`demonstrations` collects them.
:func:`outcome_differences` runs a scenario under legacy and series and says what differs (verdict,
violations, a step's result or errno, a counter), so a claim without a difference is caught
(``tests/test_patches.py``).  ``kvmsim patches`` prints the table (``--json``, ``--markdown`` for
``docs/patches.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    """A patch's kind, judged on the tree just before it (series-patch-map.md's R / B / A)."""

    REFACTOR = "R"
    BEHAVIOUR = "B"
    API = "A"

    @property
    def label(self) -> str:
        return {"R": "refactor", "B": "behaviour change", "A": "API change"}[self.value]


@dataclass(frozen=True)
class Patch:
    """One patch of the series."""

    number: int
    title: str
    kind: Kind
    kind_note: str          # e.g. "latent fix, Cc stable", "in isolation"
    arch: str
    difference: str         # legacy → series, one line


def _P(number: int, title: str, kind: str, note: str, arch: str, difference: str) -> Patch:
    return Patch(number, title, Kind(kind), note, arch, difference)


#: Every patch, in series order (PATCHES[n - 1].number == n).
PATCHES: tuple[Patch, ...] = (
    _P(1, 'KVM: Drop KVM_ERR_PTR_BAD_PAGE and instead return NULL to indicate an error',
       'R', '', 'generic gfn_to_page (x86, PPC xive, s390 vsie callers)',
       'gfn_to_page() failure is NULL instead of the BAD_PAGE error pointer; every caller is converted, so nothing is visible outside the kernel'),
    _P(2, 'KVM: Allow calling kvm_release_page_{clean,dirty}() on a NULL page pointer',
       'R', '', 'generic',
       'NULL becomes a no-op instead of a WARN on an error page; no caller passes NULL yet'),
    _P(3, 'KVM: Add kvm_release_page_unused() API to put pages that KVM never consumes',
       'R', '', 'generic',
       'adds a put-only helper with no caller here; its effect shows through 29/48/54/56/59/64/68/72/78'),
    _P(4, 'KVM: x86/mmu: Skip the "try unsync" path iff the old SPTE was a leaf SPTE',
       'B', 'latent fix, Cc stable', 'x86 TDP MMU make_spte',
       'When a huge leaf replaces a page-table SPTE, which always has W set: legacy skipped mmu_try_to_unsync_pages and did not set D on the new SPTE; series runs the write-protect/unsync check and sets D. Benign in practice, because write-tracked gfns never get huge pages'),
    _P(5, "KVM: x86/mmu: Don't overwrite shadow-present MMU SPTEs when prefaulting",
       'B', '', 'x86 TDP + shadow (KVM_PRE_FAULT_MEMORY, async-#PF completion, prefetch)',
       'On a present SPTE, legacy rewrote it prefetch-style: A cleared, so legacy marked the folio accessed, and W could be dropped. Series returns RET_PF_SPURIOUS and leaves SPTE and folio untouched'),
    _P(6, 'KVM: x86/mmu: Invert @can_unsync and renamed to @synchronizing',
       'R', '', 'x86',
       'none'),
    _P(7, 'KVM: x86/mmu: Mark new SPTE as Accessed when synchronizing existing SPTE',
       'B', '', 'x86 shadow paging, FNAME(sync_spte)',
       'Legacy rebuilt the SPTE with A cleared (or access-tracked); mmu_spte_update then pushed "accessed" to the folio and forced a TLB flush. Series keeps A set, so later aging still reports the page young'),
    _P(8, 'KVM: x86/mmu: Mark folio dirty when creating SPTE, not when zapping/modifying',
       'B', '', 'x86 TDP + shadow',
       "Legacy called SetPageDirty from the SPTE's D bit (W bit with A/D off) on every zap, modify, clear-dirty and A/D-off age. That is 512×512 times per 1 GiB folio when dirty logging is disabled. Series marks dirty once, when a host-writable SPTE is created, and never from SPTEs"),
    _P(9, 'KVM: x86/mmu: Mark page/folio accessed only when zapping leaf SPTEs',
       'B', '', 'x86 TDP + shadow',
       'Legacy called mark_page_accessed for every lost A bit: memslot delete/move, VM destroy, zap-collapsible, huge split, mmu_spte_update. Series (at 9) keeps it only for mmu_notifier leaf zaps, and drops those too at 82'),
    _P(10, 'KVM: x86/mmu: Use gfn_to_page_many_atomic() when prefetching indirect PTEs',
       'R', '', 'x86 shadow, indirect prefetch',
       '"subtly equivalent": GUP-fast only, accessed + put either way'),
    _P(11, 'KVM: Rename gfn_to_page_many_atomic() to kvm_prefetch_pages()',
       'R', '', 'generic',
       'none'),
    _P(12, 'KVM: Drop @atomic param from gfn=>pfn and hva=>pfn APIs',
       'R', '', 'generic',
       'none; the last atomic user is gone after 10'),
    _P(13, 'KVM: Annotate that all paths in hva_to_pfn() might sleep',
       'R', '', 'generic',
       'only a CONFIG_DEBUG_ATOMIC_SLEEP splat for an atomic caller, and none remain'),
    _P(14, 'KVM: Return ERR_SIGPENDING from hva_to_pfn() if GUP returns -EGAIN',
       'B', '', 'generic hva_to_pfn',
       'GUP returns -EAGAIN when the killable mmap_lock fails, i.e. a fatal signal is pending. Legacy fell through to vma_lookup and ended in KVM_PFN_ERR_FAULT (KVM_RUN -EFAULT) or an async retry. Series returns KVM_PFN_ERR_SIGPENDING, i.e. an -EINTR exit'),
    _P(15, 'KVM: Drop extra GUP (via check_user_page_hwpoison()) to detect poisoned page',
       'R', '', 'generic',
       'dead code: slow GUP already passes FOLL_HWPOISON'),
    _P(16, 'KVM: Replace "async" pointer in gfn=>pfn with "no_wait" and error code',
       'R', '', 'generic / x86',
       'internal only: KVM_PFN_ERR_NEEDS_IO replaces `*async = true`; x86 decides on async #PF the same way'),
    _P(17, "KVM: x86/mmu: Drop kvm_page_fault.hva, i.e. don't track intermediate hva",
       'R', '', 'x86',
       'none'),
    _P(18, 'KVM: Drop unused "hva" pointer from __gfn_to_pfn_memslot()',
       'R', '', 'generic',
       'none'),
    _P(19, 'KVM: Introduce kvm_follow_pfn() to eventually replace "gfn_to_pfn" APIs',
       'R', '', 'generic',
       'none (internal struct)'),
    _P(20, 'KVM: Remove pointless sanity check on @map param to kvm_vcpu_(un)map()',
       'R', '', 'generic',
       'none'),
    _P(21, 'KVM: Explicitly initialize all fields at the start of kvm_vcpu_map()',
       'R', 'hardening', 'generic',
       'a failed map now leaves hva NULL, so a later unmap is a no-op; no in-tree caller depended on the stale fields'),
    _P(22, 'KVM: Use NULL for struct page pointer to indicate mremapped memory',
       'R', '', 'generic',
       'none'),
    _P(23, 'KVM: nVMX: Rely on kvm_vcpu_unmap() to track validity of eVMCS mapping',
       'R', '', 'x86 nVMX',
       'none'),
    _P(24, 'KVM: nVMX: Drop pointless msr_bitmap_map field from struct nested_vmx',
       'R', '', 'x86 nVMX',
       'none'),
    _P(25, 'KVM: nVMX: Add helper to put (unmap) vmcs12 pages',
       'R', '', 'x86 nVMX',
       'none'),
    _P(26, 'KVM: Use plain "struct page" pointer instead of single-entry array',
       'R', '', 'generic',
       'none'),
    _P(27, 'KVM: Provide refcounted page as output field in struct kvm_follow_pfn',
       'R', '', 'generic',
       "adds an optional output; remapped pfns are still guessed and get_page_unless_zero'd until 85"),
    _P(28, 'KVM: Move kvm_{set,release}_page_{clean,dirty}() helpers up in kvm_main.c',
       'R', '', 'generic',
       'none'),
    _P(29, 'KVM: pfncache: Precisely track refcounted pages',
       'B', '', 'generic pfncache (hva_to_pfn_retry)',
       'Legacy: kvm_release_pfn_clean (accessed + put) on every retry and on success. Series: a retry releases with release_page_unused (put only); success releases the held page with release_page_clean'),
    _P(30, 'KVM: Migrate kvm_vcpu_map() to kvm_follow_pfn()',
       'R', '', 'generic',
       'unmap releases map->refcounted_page instead of guessing from the pfn; it is the same page'),
    _P(31, 'KVM: Pin (as in FOLL_PIN) pages during kvm_vcpu_map()',
       'B', '', 'generic kvm_vcpu_map (nVMX, nSVM, SEV-ES GHCB, later PPC dcbz)',
       'Legacy: FOLL_GET (+1), put_page at unmap. Series: FOLL_PIN (+1024 on a small folio, pincount on a large one, no-op on the zero page; folio_maybe_dma_pinned is true), unpin_user_page at unmap'),
    _P(32, "KVM: nVMX: Mark vmcs12's APIC access page dirty when unmapping",
       'B', '', 'x86 nVMX',
       'In nested_put_vmcs12_pages, legacy unmapped the L1 APIC-access page with dirty=false: gfn not in the dirty log, folio not dirtied. Series marks it dirty (mark_page_dirty + SetPageDirty)'),
    _P(33, 'KVM: Pass in write/dirty to kvm_vcpu_map(), not kvm_vcpu_unmap()',
       'R', 'API', 'generic + x86 callers',
       'map->writable now decides dirty. Nothing changes for any in-tree caller: after 32 all of them passed true, and the MSR bitmap switched to kvm_vcpu_map_readonly and is still unmapped clean'),
    _P(34, 'KVM: Get writable mapping for __kvm_vcpu_map() only when necessary',
       'A', '', 'generic + nVMX MSR bitmap',
       'kvm_vcpu_map_readonly resolves without FOLL_WRITE: it works on read-only memslots and VMAs, breaks no CoW and dirties nothing. Legacy always used FOLL_WRITE (-EINVAL on a read-only slot)'),
    _P(35, 'KVM: Disallow direct access (w/o mmu_notifier) to unpinned pfn by default',
       'A', '', 'generic kvm_vcpu_map; module param kvm.allow_unsafe_mappings',
       'kvm_vcpu_map of VM_PFNMAP/VM_IO memory: legacy memremapped/kmapped it unprotected, taking a ref through kvm_try_get_pfn. Series refuses it (-EINVAL → FAULT) unless allow_unsafe_mappings=1'),
    _P(36, "KVM: x86: Don't fault-in APIC access page during initial allocation",
       'B', '', 'x86 APIC-access memslot (VMX APICv / SVM AVIC)',
       'Legacy kvm_alloc_apic_access_page did gfn_to_page + put_page: it allocated and touched the anon page at setup and could fail with -EFAULT there. Series defers this to first use'),
    _P(37, 'KVM: x86/mmu: Add "mmu" prefix fault-in helpers to free up generic names',
       'R', '', 'x86',
       'none'),
    _P(38, 'KVM: x86/mmu: Put direct prefetched pages via kvm_release_page_clean()',
       'B', '', 'x86 shadow MMU, direct prefetch',
       'direct_pte_prefetch_many: legacy does put_page only; series also marks accessed, and dirty as well from 41'),
    _P(39, 'KVM: x86/mmu: Add common helper to handle prefetching SPTEs',
       'R', '', 'x86 shadow',
       'none (dedup)'),
    _P(40, 'KVM: x86/mmu: Add helper to "finish" handling a guest page fault',
       'B', 'despite "no functional change intended"', 'x86 TDP + shadow fault',
       'kvm_release_pfn_clean (accessed + put) moves from after the mmu_lock unlock to before it'),
    _P(41, 'KVM: x86/mmu: Mark pages/folios dirty at the origin of make_spte()',
       'B', '', 'x86 fault, prefetch, sync',
       'At fault finish, release dirty iff map_writable, even when the SPTE was made read-only, under a lockdep assert. Prefetch releases with release_page_dirty. make_spte no longer touches a struct page and sync_spte marks nothing. Net vs legacy: the folio is dirtied at map time, not at zap'),
    _P(42, 'KVM: Move declarations of memslot accessors up in kvm_host.h',
       'R', '', 'generic',
       'none'),
    _P(43, 'KVM: Add kvm_faultin_pfn() to specifically service guest page faults',
       'R', '', 'generic',
       'adds wrappers'),
    _P(44, 'KVM: x86/mmu: Convert page fault paths to kvm_faultin_pfn()',
       'R', '', 'x86',
       '"no functional change": the fault only captures refcounted_page'),
    _P(45, 'KVM: guest_memfd: Pass index, not gfn, to __kvm_gmem_get_pfn()',
       'R', '', 'guest_memfd',
       'none'),
    _P(46, 'KVM: guest_memfd: Provide "struct page" as output from kvm_gmem_get_pfn()',
       'R', '', 'guest_memfd, SEV-SNP',
       'Adds a page output. The SNP RMP-fault put_page → release_page_unused swap and the VMSA release_pfn_clean → release_page_clean swap change nothing'),
    _P(47, 'KVM: x86/mmu: Put refcounted pages instead of blindly releasing pfns',
       'R', 'in isolation', 'x86',
       'fault->refcounted_page is released instead of kvm_pfn_to_refcounted_page(pfn); they are the same page for every backing until 85 leaves remapped pages unheld'),
    _P(48, "KVM: x86/mmu: Don't mark unused faultin pages as accessed",
       'B', '', 'x86 fault',
       'On RET_PF_RETRY (lockless pre-check or is_page_fault_stale), legacy marked accessed and put; series only puts'),
    _P(49, "KVM: Move x86's API to release a faultin page to common KVM",
       'R', '', 'generic',
       'kvm_release_faultin_page becomes common code (lockdep: mmu_lock held or unused)'),
    _P(50, 'KVM: VMX: Hold mmu_lock until page is released when updating APIC access page',
       'B', '', 'x86 VMX APIC-access page',
       'vmx_set_apic_access_page_addr: legacy released (accessed + put) after read_unlock; series releases before read_unlock, on both the retry and the success path'),
    _P(51, 'KVM: VMX: Use __kvm_faultin_page() to get APIC access page/pfn',
       'R', 'in isolation', 'x86 VMX',
       'releases exactly the refcounted page (same page, still clean + accessed); WARNs if there is none'),
    _P(52, 'KVM: PPC: e500: Mark "struct page" dirty in kvmppc_e500_shadow_map()',
       'B', '', 'PPC e500',
       'The extra kvm_set_pfn_accessed in kvmppc_e500_ref_setup is dropped. Legacy marked accessed twice per shadow map, and the second call activates the folio on the LRU; series marks once. Dirty is still set under mmu_lock iff the guest TLBE is writable'),
    _P(53, 'KVM: PPC: e500: Mark "struct page" pfn accessed before dropping mmu_lock',
       'B', '', 'PPC e500',
       'kvm_release_pfn_clean moves before spin_unlock(mmu_lock)'),
    _P(54, 'KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults',
       'B', 'v13 regression', 'PPC e500',
       '**v13 (v6.13-rc1..rc6):** writable=NULL made __kvm_faultin_pfn WARN and return KVM_PFN_ERR_FAULT, so every non-PFNMAP shadow map failed ("real page not found"). **v6.13-rc7 fix:** Paolo\'s 5 patches track host writability, map read-only host pages read-only, use the shadow TLBE as the dirty witness, and size hugepages from find_linux_pte. **Final v6.13:** kvm_release_faultin_page(page, !!ret, writable) under mmu_lock; failures are put-only; the TLB1 VM_PFNMAP path no longer puts a page it never got'),
    _P(55, 'KVM: arm64: Mark "struct page" pfns accessed/dirty before dropping mmu_lock',
       'B', '', 'arm64 user_mem_abort',
       'kvm_set_pfn_dirty and kvm_release_pfn_clean move from after read_unlock to before it'),
    _P(56, 'KVM: arm64: Use __kvm_faultin_pfn() to handle memory aborts',
       'B', '', 'arm64',
       'On -EAGAIN (invalidation retry, or the leaf is already present), legacy marked accessed and put; series only puts (unused = !!ret)'),
    _P(57, 'KVM: RISC-V: Mark "struct page" pfns dirty iff a stage-2 PTE is installed',
       'B', '', 'RISC-V kvm_riscv_gstage_map',
       'Legacy called kvm_set_pfn_dirty before gstage_map_page, even when the map fails; series dirties only after a successful install'),
    _P(58, 'KVM: RISC-V: Mark "struct page" pfns accessed before dropping mmu_lock',
       'B', '', 'RISC-V',
       'kvm_set_pfn_accessed and the release move from after spin_unlock to before it'),
    _P(59, 'KVM: RISC-V: Use kvm_faultin_pfn() when mapping pfns into the guest',
       'B', '', 'RISC-V',
       'Release is kvm_release_faultin_page(page, ret && ret != -EEXIST, writable). Map errors are put-only. An mmu_invalidate_retry leaves ret at 0, so it still counts as used: accessed, and dirty if writable'),
    _P(60, 'KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on Book3s HV',
       'B', '', 'PPC Book3S HV (hash), kvmppc_book3s_hv_page_fault',
       'Legacy had its own rule "PageReserved → page = NULL", which skipped put_page on a GUP\'d reserved page: the zero page on read faults, and ZONE_DEVICE pages. That leaks a reference (inferred from the code). Series puts refcounted_page. GUP order is otherwise the same'),
    _P(61, 'KVM: PPC: Use __kvm_faultin_pfn() to handle page faults on Book3s Radix',
       'B', '', 'PPC Book3S Radix, kvmppc_book3s_instantiate_page',
       'same as 60, on radix'),
    _P(62, 'KVM: PPC: Drop unused @kvm_ro param from kvmppc_book3s_instantiate_page()',
       'R', '', 'PPC Radix / nested HV',
       'none'),
    _P(63, 'KVM: PPC: Book3S: Mark "struct page" pfns dirty/accessed after installing PTE',
       'B', '', 'PPC Book3S PR 64-bit, kvmppc_mmu_map_page',
       'Legacy called kvm_set_pfn_accessed (and dirty if may_write && writable) before mmu_lock and before the retry check, then release_pfn_clean after unlock, so accessed was marked twice. Series marks once, via release clean/dirty under mmu_lock after the PTE is installed'),
    _P(64, 'KVM: PPC: Use kvm_faultin_pfn() to handle page faults on Book3s PR',
       'B', '', 'PPC Book3S PR 64/32-bit',
       '64-bit: kvm_release_faultin_page(page, unused=false /*FIXME*/, may_write && writable). 32-bit host: the HPTE-cache-full -EAGAIN path is put-only instead of accessed + put'),
    _P(65, 'KVM: LoongArch: Mark "struct page" pfns dirty only in "slow" page fault path',
       'B', '', 'LoongArch',
       'The fast path (kvm_map_page_fast) no longer calls kvm_set_pfn_dirty after unlock; it only marks the memslot dirty log. The slow path dirties under mmu_lock iff host-writable; legacy dirtied after unlock and only on a write fault (_PAGE_DIRTY)'),
    _P(66, 'KVM: LoongArch: Mark "struct page" pfns accessed only in "slow" page fault path',
       'B', '', 'LoongArch',
       'Fast path: legacy took a transient get_page(guess) under the lock, called kvm_set_pfn_accessed after unlock, then put. Series does none of this'),
    _P(67, 'KVM: LoongArch: Mark "struct page" pfn accessed before dropping mmu_lock',
       'B', '', 'LoongArch',
       'slow-path release_pfn_clean moves under mmu_lock'),
    _P(68, 'KVM: LoongArch: Use kvm_faultin_pfn() to map pfns into the guest',
       'B', '', 'LoongArch kvm_map_page',
       'Retry is put-only (release_page_unused); legacy marked accessed. Success is kvm_release_faultin_page(page, false, writeable)'),
    _P(69, 'KVM: MIPS: Mark "struct page" pfns dirty only in "slow" page fault path',
       'B', '', 'MIPS',
       'The fast path (_kvm_mips_map_page_fast) drops kvm_set_pfn_dirty, which ran with no ref held. The slow path dirties iff writeable, after the PTE is set; legacy dirtied only on a write fault, before install'),
    _P(70, 'KVM: MIPS: Mark "struct page" pfns accessed only in "slow" page fault path',
       'B', '', 'MIPS',
       "the fast path's kvm_set_pfn_accessed after unlock, with no ref held, is removed"),
    _P(71, 'KVM: MIPS: Mark "struct page" pfns accessed prior to dropping mmu_lock',
       'B', '', 'MIPS kvm_mips_map_page',
       "Legacy called release_pfn_clean and then kvm_set_pfn_accessed after unlock: accessed was marked twice, and once after KVM's own put. Series does a single release under the lock"),
    _P(72, 'KVM: MIPS: Use kvm_faultin_pfn() to map pfns into the guest',
       'B', '', 'MIPS',
       'Retry is put-only. Success is kvm_release_faultin_page(page, false, writeable) under the lock'),
    _P(73, 'KVM: PPC: Remove extra get_page() to fix page refcount leak',
       'B', '', 'PPC Book3S PR, kvmppc_patch_dcbz',
       'Legacy did gfn_to_page (+1), then get_page (+1), but only one put_page, so every dcbz patch leaked +1 and the page is never freed. Series is balanced'),
    _P(74, 'KVM: PPC: Use kvm_vcpu_map() to map guest memory to patch dcbz instructions',
       'B', '', 'PPC Book3S PR',
       'Legacy used FOLL_GET + kmap_atomic: the page was written but not dirtied and the gfn not logged. Series uses kvm_vcpu_map (FOLL_PIN, PFNMAP refused unless allow_unsafe_mappings); unmap marks the gfn dirty and calls SetPageDirty'),
    _P(75, 'KVM: Convert gfn_to_page() to use kvm_follow_pfn()',
       'R', 'in isolation', 'generic',
       'gfn_to_page now returns refcounted_page; identical until 85 makes remapped pages NULL'),
    _P(76, 'KVM: Add support for read-only usage of gfn_to_page()',
       'R', 'API; first user is 77', 'generic',
       'adds __gfn_to_page(kvm, gfn, write); gfn_to_page() still resolves for write'),
    _P(77, 'KVM: arm64: Use __gfn_to_page() when copying MTE tags to/from userspace',
       'B', 'edge case', 'arm64 MTE, kvm_vm_ioctl_mte_copy_tags',
       'Legacy (gfn_to_pfn_prot + pfn_to_online_page) accepted remapped VM_PFNMAP/VM_IO pfns and read or wrote their tags: with a kvm_try_get_pfn ref if refcounted, with no ref if reserved. Series gets NULL from __gfn_to_page, so -EFAULT. ZONE_DEVICE rejection becomes put-only. Reachable only if the VMA behind an MTE memslot is replaced by a PFNMAP mapping, since the slot had to be VM_MTE_ALLOWED'),
    _P(78, 'KVM: PPC: Explicitly require struct page memory for Ultravisor sharing',
       'B', '', 'PPC Book3S HV uvmem',
       "kvmppc_share_page and kvmppc_send_page_to_uv: legacy's gfn_to_pfn accepted any pfn, including a PFNMAP pfn with no struct page, and passed it to uv_page_in; the retry path released clean. Series gets NULL from gfn_to_page, so H_PARAMETER / -EFAULT, and the retry path is put-only"),
    _P(79, 'KVM: Drop gfn_to_pfn() APIs now that all users are gone',
       'R', '', 'generic',
       'none'),
    _P(80, 'KVM: s390: Use kvm_release_page_dirty() to unpin "struct page" memory',
       'R', '', 's390 vsie, unpin_guest_page',
       'release_pfn_dirty(hpa>>PAGE_SHIFT) becomes release_page_dirty(pfn_to_page(...)) on the same page, which gfn_to_page pinned'),
    _P(81, 'KVM: Make kvm_follow_pfn.refcounted_page a required field',
       'R', '', 'generic',
       'WARN + FAULT if it is NULL; every caller passes one'),
    _P(82, 'KVM: x86/mmu: Don\'t mark "struct page" accessed when zapping SPTEs',
       'B', '', 'x86 TDP + shadow',
       'mmu_notifier zaps (tdp_mmu_zap_leafs, mmu_spte_clear_track_bits) stop calling mark_page_accessed. The shadow MMU\'s "page_count == 0" WARN is dropped too. Visible to page_idle and access_tracking_perf_test (Levitsky\'s bisect to 66bc627e7fee)'),
    _P(83, 'KVM: arm64: Don\'t mark "struct page" accessed when making SPTE young',
       'B', '', 'arm64 handle_access_fault',
       'legacy called kvm_set_pfn_accessed(pte pfn) after read_unlock, holding no reference; series does nothing'),
    _P(84, 'KVM: Drop APIs that manipulate "struct page" via pfns',
       'R', '', 'generic',
       'none; all users are gone after 82/83'),
    _P(85, 'KVM: Don\'t grab reference on VM_MIXEDMAP pfns that have a "struct page"',
       'B', '', 'generic: every arch, plus gfn_to_page users',
       'hva_to_pfn_remapped, legacy kvm_try_get_pfn: guess + get_page_unless_zero. Refcount 0 (e.g. TTM non-compound tails) → EFAULT. Refcount > 0 → KVM takes and puts a ref it does not own, and marks A/D. Series never touches the refcount and maps any pfn; gfn_to_page returns NULL for remapped memory'),
)

assert [p.number for p in PATCHES] == list(range(1, 86))


def patch(number: int) -> Patch:
    """The row of patch ``number`` (1..85)."""
    if not 1 <= number <= len(PATCHES):
        raise KeyError(f"no patch {number}: the series has patches 1..{len(PATCHES)}")
    return PATCHES[number - 1]


# ---- demonstrations --------------------------------------------------------------------------------

def demonstrations(scenarios=None) -> dict[int, list[str]]:
    """Patch number → the bundled scenarios that declare ``patches = [..., N, ...]``, sorted by name."""
    from kvmsim.scenarios import library
    out: dict[int, list[str]] = {p.number: [] for p in PATCHES}
    for sc in (library() if scenarios is None else scenarios):
        for n in sc.patches:
            out[n].append(sc.name)
    return {n: sorted(v) for n, v in out.items()}


def outcome(rr) -> dict:
    """What a run shows, for comparing two policies: verdict, violations per invariant, each step's
    result and errno, and every counter (journal counters plus what KVM did to struct pages)."""
    return {"verdict": rr.verdict, "violations": rr.by_invariant(),
            "steps": [(s.res.result, s.res.errno_name) for s in rr.steps],
            "counters": {k: v for k, v in rr.counters.items() if v}}


def outcome_differences(sc, a: str = "legacy", b: str = "series") -> list[str]:
    """Run ``sc`` under policies ``a`` and ``b``; what differs (empty: the two outcomes are the same)."""
    from kvmsim.scenarios.runner import run
    oa, ob = outcome(run(sc, a)), outcome(run(sc, b))
    out = []
    if oa["verdict"] != ob["verdict"]:
        out.append(f"verdict {oa['verdict']} / {ob['verdict']}")
    if oa["violations"] != ob["violations"]:
        out.append(f"violations {oa['violations'] or '{}'} / {ob['violations'] or '{}'}")
    for i, (sa, sb) in enumerate(zip(oa["steps"], ob["steps"]), 1):
        if sa != sb:
            out.append(f"step {i} {'/'.join(map(str, sa))} vs {'/'.join(map(str, sb))}")
    if len(oa["steps"]) != len(ob["steps"]):
        out.append(f"steps run {len(oa['steps'])} / {len(ob['steps'])}")
    names = sorted(set(oa["counters"]) | set(ob["counters"]))
    diff = [f"{k} {oa['counters'].get(k, 0)}/{ob['counters'].get(k, 0)}" for k in names
            if oa["counters"].get(k, 0) != ob["counters"].get(k, 0)]
    if diff:
        out.append("counters " + ", ".join(diff))
    return out


def table(*, check: bool = False) -> list[dict]:
    """The rows as dicts (``kvmsim patches --json``); with ``check`` each demonstrating scenario is run
    under legacy and series and carries what differs."""
    from kvmsim.scenarios import library
    scs = {sc.name: sc for sc in library()}
    demos = demonstrations(scs.values())
    rows = []
    for p in PATCHES:
        row = {"number": p.number, "title": p.title, "kind": p.kind.label, "kind_note": p.kind_note,
               "arch": p.arch, "difference": p.difference, "scenarios": demos[p.number]}
        if check:
            row["differences"] = {n: outcome_differences(scs[n]) for n in demos[p.number]}
        rows.append(row)
    return rows


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict] | None = None) -> str:
    """``docs/patches.md`` (``kvmsim patches --markdown``)."""
    rows = table() if rows is None else rows
    kinds = {k.label: [r["number"] for r in rows if r["kind"] == k.label] for k in Kind}
    shown = [r for r in rows if r["kind"] != Kind.REFACTOR.label]
    missing = [r["number"] for r in shown if r["kind"] == Kind.BEHAVIOUR.label and not r["scenarios"]]
    out = ["# The 85 patches and their demonstrations",
           "",
           "Generated by `kvmsim patches --markdown > docs/patches.md` from `src/kvmsim/patches.py` and the",
           "`patches = [...]` keys of the bundled scenarios; `tests/test_patches.py` checks it is current, and that",
           "every demonstrating scenario's legacy and series outcomes differ (`kvmsim patches --check`).",
           "",
           "| kind | count |",
           "|---|---|"]
    out += [f"| {label} | {len(ns)} |" for label, ns in kinds.items()]
    out += ["", f"Behaviour changes without a bundled demonstration: "
                f"{', '.join(map(str, missing)) if missing else 'none'}.", "",
            "| # | title | kind | arch / area | legacy → series | scenarios |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        kind = r["kind"] + (f" ({r['kind_note']})" if r["kind_note"] else "")
        scen = ", ".join(f"`{n}`" for n in r["scenarios"]) or ("—" if r["kind"] != Kind.REFACTOR.label else "")
        out.append(f"| {r['number']} | {_cell(r['title'])} | {_cell(kind)} | {_cell(r['arch'])} | "
                   f"{_cell(r['difference'])} | {scen} |")
    return "\n".join(out) + "\n"
