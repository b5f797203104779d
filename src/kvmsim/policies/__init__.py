"""The policy seam: the only place where legacy (v6.12) and series (v6.13) KVM differ.

Model code calls a hook of :class:`Policy` at every point where the kernel diverged; it never
compares policy names.  Each hook's docstring cites the series patch that changed the behaviour
("KVM: Stop grabbing references to PFNMAP'd pages", v13, merged as 5cb1659f4120 for v6.13).

``get_policy(name)`` returns one of:

* ``legacy``  - Linux v6.12 (:mod:`kvmsim.policies.legacy`)
* ``series``  - Linux v6.13 (:mod:`kvmsim.policies.series`)
* ``pre-5.13`` - Linux <= v5.12, before CVE-2021-22543 was fixed (:mod:`kvmsim.policies.pre513`)
* ``series-only`` - the series on a v6.12 base: ``series`` without the other 6.13 MMU changes
  (:mod:`kvmsim.policies.series_only`)
* ``series-rc1`` - Linux v6.13-rc1 .. rc6, the series as posted: "series" everywhere but PPC e500,
  whose patch 54 "KVM: PPC: e500: Use __kvm_faultin_pfn() to handle page faults" passed a NULL
  ``writable`` (:mod:`kvmsim.policies.series_rc1`)
* ``current`` - upstream as of Linux v6.18 (the development hosts' kernel): v6.13 plus the observable
  MMU changes of v6.14 .. v6.18 (:mod:`kvmsim.policies.current`)

or a user's plugin, ``path/to/file.py:ClassName`` / ``module:ClassName`` (a subclass of one of these that
overrides the hooks a proposed patch changes; :mod:`kvmsim.policies.plugin`, docs/policies.md).
"""

from __future__ import annotations

import functools
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
    def spte_ad_lost_bulk(self, kvm, pfns, dirty_mask, accessed_mask, caller: str) -> None: ...
    def arch_ops(self, arch: str) -> object | None: ...
    def dirty_ring_reset(self) -> Callable: ...
    def gmem_supported_flags(self, kvm) -> int: ...
    def supports_gmem(self, kvm) -> bool: ...
    mmu_613_other: bool


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
    #: The arch's own per-policy callables: a namespace its folder defines (arm64 ``Arm64Ops``, LoongArch
    #: ``LoongArchOps``, s390 ``S390Ops``, PowerPC ``E500Ops`` / ``Book3sOps``), resolved by the policy's
    #: ``arch_ops(arch)``; None for an arch with no difference of its own beyond the fault's release.
    arch_ops: object | None = None
    #: The kernel release's other 6.13 MMU changes (not the series): a VM takes them unless created with
    #: ``v613_other`` set either way (``v613_other=False`` with the series policy: "series only").
    mmu_613_other: bool = False
    #: ``(kvm, vcpu, nr_entries_reset, signal_pending) -> 0 / -EINTR``: one vCPU's ``kvm_dirty_ring_reset()``
    #: (:mod:`kvmsim.kvm.dirty`; v6.17 bounded it and made it stop on a pending signal).
    dirty_ring_reset: Callable | None = None
    #: ``(kvm) -> flags``: ``kvm_gmem_get_supported_flags()``, the KVM_CREATE_GUEST_MEMFD flags accepted
    #: (v6.18 GUEST_MEMFD_FLAG_MMAP / INIT_SHARED; none before).
    gmem_supported_flags: Callable | None = None
    #: ``(kvm) -> bool``: ``kvm_arch_supports_gmem()`` (v6.13 ``kvm_arch_has_private_mem()``): may a memslot
    #: take KVM_MEM_GUEST_MEMFD?
    supports_gmem: Callable | None = None


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
                  arch_ops=policy.arch_ops(arch), mmu_613_other=policy.mmu_613_other,
                  dirty_ring_reset=policy.dirty_ring_reset(), gmem_supported_flags=policy.gmem_supported_flags,
                  supports_gmem=policy.supports_gmem)


def load_arch_ops(table: dict[str, str], arch: str) -> object | None:
    """The namespace ``table`` names for ``arch`` (``"module:NAME"``, imported on first use: an arch
    folder imports the model, which imports the policies), or None."""
    import importlib
    ref = table.get(arch)
    if ref is None:
        return None
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def get_policy(name: str) -> Policy:
    """The policy ``name`` names: a shipped one (:func:`shipped_policies`), or a user's plugin
    (``path/to/file.py:ClassName``, ``module:ClassName``, or the name a loaded plugin registered;
    :mod:`kvmsim.policies.plugin`)."""
    shipped = shipped_policies()
    cls = shipped.get(name)
    if cls is not None:
        return cls()
    from kvmsim.policies import plugin
    if plugin.is_plugin_spec(name):
        name = plugin.load_plugin(name)
    cls = plugin.registered(name)
    if cls is not None:
        return plugin.instantiate(cls)
    raise UsageError(f"unknown policy {name!r}; choose one of {', '.join(shipped)}, "
                     f"or a plugin: path/to/file.py:ClassName or module:ClassName")


POLICY_NAMES = ("legacy", "series", "pre-5.13", "series-rc1", "series-only", "current")
DEFAULT_POLICY = "series"


@functools.cache
def shipped_policies() -> dict[str, type]:
    """The shipped policies by name (imported on first use: the policy modules import the model)."""
    from kvmsim.policies.current import CurrentPolicy
    from kvmsim.policies.legacy import LegacyPolicy
    from kvmsim.policies.pre513 import Pre513Policy
    from kvmsim.policies.series import SeriesPolicy
    from kvmsim.policies.series_only import SeriesOnlyPolicy
    from kvmsim.policies.series_rc1 import SeriesRc1Policy
    return {"legacy": LegacyPolicy, "series": SeriesPolicy, "pre-5.13": Pre513Policy, "series-rc1": SeriesRc1Policy,
            "series-only": SeriesOnlyPolicy, "current": CurrentPolicy}
