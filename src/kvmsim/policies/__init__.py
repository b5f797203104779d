"""The policy seam: the only place where legacy (v6.12) and series (v6.13) KVM differ.

Model code calls a hook of :class:`Policy` at every point where the kernel diverged; it never
compares policy names.  Each hook's docstring cites the series patch that changed the behaviour
("KVM: Stop grabbing references to PFNMAP'd pages", v13, merged as 5cb1659f4120 for v6.13).

``get_policy(name)`` returns one of:

* ``legacy``  - Linux v6.12 (:mod:`kvmsim.policies.legacy`)
* ``series``  - Linux v6.13 (:mod:`kvmsim.policies.series`)
* ``pre-5.13`` - Linux <= v5.12, before CVE-2021-22543 was fixed (:mod:`kvmsim.policies.pre513`)
* ``series-rc1`` - Linux v6.13-rc1 .. rc6, the series as posted: "series" everywhere but PPC e500,
  whose patch 54 "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults" passed a NULL
  ``writable`` (:mod:`kvmsim.policies.series_rc1`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from kvmsim.errors import UsageError


class Policy(Protocol):
    name: str
    title: str

    def fault_release(self, arch: str) -> tuple[Callable, Callable, Callable]: ...
    def fault_release_bulk(self) -> tuple[Callable, Callable, str]: ...
    def reported_page(self, kfp) -> int | None: ...
    def gup_error_pfn(self, rc: int) -> int | None: ...
    def needs_io_pfn(self, kfp) -> int: ...
    def refuses_unpinned_direct_map(self, kvm) -> bool: ...
    def remapped_get_ref(self, kvm, pfn: int, caller: str) -> tuple[bool, object]: ...
    def release_faultin(self, kvm, pfn: int, kfp, *, unused: bool, dirty: bool, caller: str,
                        gfn: int | None = None) -> None: ...
    def release_clean(self, kvm, pfn: int, kfp, *, caller: str, unused: bool = False) -> None: ...
    def release_prefetched(self, kvm, pfn: int, caller: str) -> None: ...
    def gfn_to_page_write(self, write: bool) -> bool: ...
    def gfn_to_page_result(self, kvm, pfn: int, kfp) -> int | None: ...
    def vcpu_map_pins(self) -> bool: ...
    def vcpu_map_write(self, writable: bool) -> bool: ...
    def vcpu_map_dirty_at_map(self) -> bool: ...
    def spte_ad_lost(self, kvm, pfn: int, *, dirty: bool, accessed: bool, caller: str,
                     gfn: int | None = None, n: int = 1) -> None: ...
    def vsie_unpin_release(self) -> Callable: ...
    def fast_path_get_page(self, kvm, pfn: int, caller: str) -> int | None: ...
    def arch_ops(self, arch: str) -> object | None: ...
    def arch_faultin(self, arch: str) -> Callable | None: ...


@dataclass(frozen=True)
class KvmOps:
    """A VM's policy resolved once, at creation, for its architecture (the way drgn picks
    ``_get_PageSlab_impl`` once per program): plain callables the model calls where v6.12 and v6.13
    differ.  Each one's docstring cites the series patch that changed it.  ``kvmsim.explore.mutations``
    may replace one with a wrapper (``dataclasses.replace``) when it installs a mutation."""

    #: ``(kvm, mmu, fault)`` before dropping ``mmu_lock`` (v6.13 ``kvm_release_faultin_page()``); None: nothing.
    fault_release_locked: Callable | None
    #: ``(kvm, mmu, fault)`` after dropping it (v6.12's per-arch order); None: nothing.
    fault_release_unlocked: Callable | None
    #: ``(kvm, fault)`` before the map, where the arch calls it (v6.12 RISC-V ``kvm_set_pfn_dirty()`` under the
    #: lock, v6.12 Book3S PR ``kvm_set_pfn_accessed/dirty()`` before taking it); None: nothing.
    fault_dirty_before_map: Callable | None
    #: ``(kvm, pfn, kfp, *, unused, dirty, caller, gfn)``: a faulted-in page released outside a fault's end.
    release_faultin: Callable
    #: ``(kvm, pfns, writable_mask, caller, gfns)``: the bulk fault's release, under / after ``mmu_lock``.
    fault_release_bulk_locked: Callable
    fault_release_bulk_unlocked: Callable
    #: The caller name of the bulk fault's release (``kvm_release_faultin_page`` / ``kvm_release_pfn_clean``).
    fault_release_bulk_caller: str
    spte_ad_lost: Callable
    spte_ad_lost_bulk: Callable
    #: ``(kvm, hpa, gfn)``: s390 ``unpin_guest_page()``'s release (:mod:`kvmsim.s390.vsie`), changed by
    #: patch 80 "KVM: s390: Use kvm_release_page_dirty() to unpin "struct page" memory".
    vsie_unpin_release: Callable | None = None
    #: ``(kvm, pfn, caller)`` under ``mmu_lock`` in a fast path that changed a PTE: the page it took a
    #: transient reference on (v6.12 LoongArch ``kvm_map_page_fast()``), or None.
    fast_path_get_page: Callable = lambda kvm, pfn, caller: None
    #: arm64 ``transparent_hugepage_adjust()``: ``(kvm, fault, head)`` under the read lock (v6.12's refcount
    #: transfer to the THP head page); None: nothing.
    thp_adjust_refcount: Callable | None = None
    #: arm64 ``kvm_vm_ioctl_mte_copy_tags()``: the page of one gfn, ``.get(kvm, gfn, write)`` and
    #: ``.put(kvm, token, dirty, gfn)`` (kvmsim.arm64.mte).
    mte_tag_page: object = None
    #: An arch's own per-policy callables (a namespace the arch defines, e.g. PowerPC Book3S's
    #: :class:`kvmsim.ppc.book3s.Book3sOps`); None for an arch that needs none.
    arch_ops: object | None = None
    #: ``(kvm, mmu, fault) -> (pfn, kfp)`` in place of the template's ``__kvm_faultin_pfn()`` (PPC e500); None: the template's.
    arch_faultin: Callable | None = None


def _no_bulk_release(kvm, pfns, writable_mask, caller, gfns=None) -> None:
    """Nothing at this point (the bulk release happens at the other one)."""


def resolve(policy: Policy, arch: str) -> KvmOps:
    """The (policy × arch) choice, made once per VM.  ``arch`` is the MMU family: ``x86``, ``arm64``,
    ``riscv``, ``loongarch``, ``mips``, ``s390``, ``ppc-*`` or ``generic``."""
    locked, unlocked, before_map = policy.fault_release(arch)
    bulk_fn, bulk_under_lock, bulk_caller = policy.fault_release_bulk()
    return KvmOps(fault_release_locked=locked, fault_release_unlocked=unlocked, fault_dirty_before_map=before_map,
                  release_faultin=policy.release_faultin,
                  fault_release_bulk_locked=bulk_fn if bulk_under_lock else _no_bulk_release,
                  fault_release_bulk_unlocked=_no_bulk_release if bulk_under_lock else bulk_fn,
                  fault_release_bulk_caller=bulk_caller,
                  spte_ad_lost=policy.spte_ad_lost, spte_ad_lost_bulk=policy.spte_ad_lost_bulk,
                  vsie_unpin_release=policy.vsie_unpin_release(),
                  fast_path_get_page=policy.fast_path_get_page,
                  thp_adjust_refcount=policy.thp_adjust_refcount, mte_tag_page=policy.mte_tag_page,
                  arch_ops=policy.arch_ops(arch),
                  arch_faultin=policy.arch_faultin(arch))


def get_policy(name: str) -> Policy:
    from kvmsim.policies.legacy import LegacyPolicy
    from kvmsim.policies.pre513 import Pre513Policy
    from kvmsim.policies.series import SeriesPolicy
    from kvmsim.policies.series_rc1 import SeriesRc1Policy

    table = {"legacy": LegacyPolicy, "series": SeriesPolicy, "pre-5.13": Pre513Policy, "series-rc1": SeriesRc1Policy}
    try:
        return table[name]()
    except KeyError:
        raise UsageError(f"unknown policy {name!r}; choose one of {', '.join(table)}") from None


POLICY_NAMES = ("legacy", "series", "pre-5.13", "series-rc1")
DEFAULT_POLICY = "series"
