"""The policy seam: the only place where legacy (v6.12) and series (v6.13) KVM differ.

Model code calls a hook of :class:`Policy` at every point where the kernel diverged; it never
compares policy names.  Each hook's docstring cites the series patch that changed the behaviour
("KVM: Stop grabbing references to PFNMAP'd pages", v13, merged as 5cb1659f4120 for v6.13).

``get_policy(name)`` returns one of:

* ``legacy``  - Linux v6.12 (:mod:`kvmsim.policies.legacy`)
* ``series``  - Linux v6.13 (:mod:`kvmsim.policies.series`)
* ``pre-5.13`` - Linux <= v5.12, before CVE-2021-22543 was fixed (:mod:`kvmsim.policies.pre513`)
"""

from __future__ import annotations

from typing import Protocol

from kvmsim.errors import UsageError


class Policy(Protocol):
    name: str
    title: str
    #: Where a fault releases its page: under mmu_lock (series) or after unlocking (legacy).
    release_under_mmu_lock: bool

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


def get_policy(name: str) -> Policy:
    from kvmsim.policies.legacy import LegacyPolicy
    from kvmsim.policies.pre513 import Pre513Policy
    from kvmsim.policies.series import SeriesPolicy

    table = {"legacy": LegacyPolicy, "series": SeriesPolicy, "pre-5.13": Pre513Policy}
    try:
        return table[name]()
    except KeyError:
        raise UsageError(f"unknown policy {name!r}; choose one of {', '.join(table)}") from None


POLICY_NAMES = ("legacy", "series", "pre-5.13")
DEFAULT_POLICY = "series"
