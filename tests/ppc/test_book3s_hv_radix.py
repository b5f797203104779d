"""Book3S HV (hash) ``kvmppc_book3s_hv_page_fault()`` and Radix ``kvmppc_book3s_instantiate_page()``
(arch/powerpc/kvm/book3s_64_mmu_hv.c, book3s_64_mmu_radix.c) under v6.12 and v6.13: patch 60 "KVM:
PPC: Use __kvm_faultin_pfn() to handle page faults on Book3s HV" and patch 61 "KVM: PPC: Use
__kvm_faultin_pfn() to handle page faults on Book3s Radix".

v6.12's ``page = NULL if PageReserved(page)`` skips the put of a GUP'd zero page (INV-1 leak);
v6.13 puts the refcounted page.  Both call ``set_page_dirty_lock()`` after the unlock for a writable
leaf, and put the page after a retry without dirtying it.
"""

from __future__ import annotations

import pytest

from kvmsim.check import check_all
from kvmsim.errors import UsageError
from kvmsim.kvm.arch import make_arch
from kvmsim.kvm.fault import FaultRet
from kvmsim.kvm.pfn import Hold
from kvmsim.kvm.vcpu import Exit
from kvmsim.ppc import Book3sHvMmu, Book3sRadixMmu
from kvmsim.ppc.book3s import kvmppc_faultin_page_to_put, kvmppc_v612_page_to_put
from kvmsim.sched import run_interleaved
from kvmsim.trace import FactKind

from tests.helpers import make_vm

HV_ARCHES = [("ppc-book3s-hv", Book3sHvMmu, "kvmppc_book3s_hv_page_fault"),
             ("ppc-book3s-radix", Book3sRadixMmu, "kvmppc_book3s_instantiate_page")]


def _inv(kvm, inv):
    return [v for v in check_all(kvm) if v.invariant == inv]


def _facts(kvm, kind, caller=None):
    return [f for f in kvm.journal.facts if f.kind == kind and (caller is None or f.caller == caller)]


@pytest.mark.parametrize("arch,cls,_", HV_ARCHES)
def test_the_profiles_are_arches_and_listed_in_the_error(arch, cls, _):
    _, kvm, _, _ = make_vm("series", arch=arch)
    assert isinstance(kvm.arch, cls) and kvm.arch.family == arch
    with pytest.raises(UsageError, match="ppc-book3s-radix"):
        make_arch(kvm, "ppc-e600")


@pytest.mark.parametrize("arch,_,caller", HV_ARCHES)
def test_legacy_never_puts_the_zero_page_gup_referenced(arch, _, caller):
    """v6.12: a read fault on untouched anon memory GUPs the zero page (a reference), then ``page = NULL``
    because it is PG_reserved: no put, and the checker reports the leak (INV-1), under legacy only."""
    host, kvm, vma, vcpu = make_vm("legacy", arch=arch)
    assert vcpu.read(0).exit == Exit.OK
    zero = host.phys.zero_pfn
    assert kvm.arch.leaf_access(vcpu, kvm.gfn_to_memslot(0), 0, False) == zero
    assert kvm.host_refs == {(zero, Hold.GET): 1}
    assert _facts(kvm, FactKind.PUT, caller) == []
    leaks = _inv(kvm, "INV-1")
    assert len(leaks) == 1 and leaks[0].pfn == zero and "leak" in leaks[0].detail


@pytest.mark.parametrize("arch,_,caller", HV_ARCHES)
def test_series_puts_the_refcounted_zero_page(arch, _, caller):
    """v6.13: ``__kvm_faultin_pfn(..., &page)`` reports the zero page as the refcounted page; it is put."""
    host, kvm, vma, vcpu = make_vm("series", arch=arch)
    assert vcpu.read(0).exit == Exit.OK
    zero = host.phys.zero_pfn
    puts = _facts(kvm, FactKind.PUT, caller)
    assert [f.pfn for f in puts] == [zero]
    assert kvm.host_refs == {}
    assert check_all(kvm) == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("arch,_,caller", HV_ARCHES)
def test_writable_leaf_is_dirtied_with_set_page_dirty_lock_after_the_unlock_then_put(policy, arch, _, caller):
    """Both versions: ``if (!ret && writable) set_page_dirty_lock(page); put_page(page);`` after the lock
    is dropped, on a normal page: dirty once, unlocked, outside the fault-release accounting (not INV-3)."""
    host, kvm, vma, vcpu = make_vm(policy, arch=arch)
    host.mm.host_access(vma.start, True, 1)
    assert vcpu.write(0, 7).exit == Exit.OK
    dirty = _facts(kvm, FactKind.SET_DIRTY, "set_page_dirty_lock")
    assert len(dirty) == 1 and not dirty[0].locked and not dirty[0].by_fault_release
    put = _facts(kvm, FactKind.PUT, caller)
    assert [f.pfn for f in put] == [dirty[0].pfn]
    assert kvm.journal.facts.index(dirty[0]) < kvm.journal.facts.index(put[0])
    assert [f for f in _facts(kvm, FactKind.MARK_ACCESSED) if f.kvm] == []      # no mark_page_accessed by KVM
    assert check_all(kvm) == []


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("arch,_,caller", HV_ARCHES)
def test_a_retry_puts_the_page_without_dirtying_it(policy, arch, _, caller):
    """An invalidation between the ``mmu_seq`` snapshot and the locked check: HV returns RESUME_GUEST,
    Radix -EAGAIN (``kvmppc_create_pte()``); the page is put, not dirtied, no leaf is installed."""
    host, kvm, vma, vcpu = make_vm(policy, arch=arch)
    host.mm.host_access(vma.start, True, 1)
    out = run_interleaved({"vcpu": kvm.arch.page_fault.steps(vcpu, 0, True),
                           "host": host.mm.munmap.steps(vma.start, 4096)},
                          ["vcpu", "vcpu", "host", "host", "host", "host"], sched=kvm.sched)
    assert out["vcpu"] == FaultRet.RETRY
    assert kvm.journal.counters["fault_retry"] == 1
    assert _facts(kvm, FactKind.SET_DIRTY, "set_page_dirty_lock") == []
    assert len(_facts(kvm, FactKind.PUT, caller)) == 1
    assert list(kvm.arch.leaves()) == []


def test_retry_returns_differ_hv_resume_guest_radix_eagain():
    assert Book3sHvMmu.fault_retry_ret == 0
    assert Book3sRadixMmu.fault_retry_ret == -11


@pytest.mark.parametrize("arch", ["ppc-book3s-hv", "ppc-book3s-radix"])
def test_the_policy_picks_the_page_rule_once_per_vm(arch):
    """The v6.12 / v6.13 choice is resolved at VM creation (``kvm.ops.arch_ops``), never by a flag: the
    legacy VM holds the v6.12 rule, the series VM the refcounted page, and neither releases through the
    template's release hooks (HV / Radix release by themselves after the unlock)."""
    _, legacy, _, _ = make_vm("legacy", arch=arch)
    _, series, _, _ = make_vm("series", arch=arch)
    assert legacy.ops.arch_ops.page_to_put is kvmppc_v612_page_to_put
    assert series.ops.arch_ops.page_to_put is kvmppc_faultin_page_to_put
    for kvm in (legacy, series):
        assert kvm.ops.fault_release_locked is None and kvm.ops.fault_release_unlocked is None


@pytest.mark.parametrize("arch", ["ppc-book3s-hv", "ppc-book3s-radix"])
def test_no_memslot_is_mmio_and_a_store_to_a_readonly_slot_is_a_dsi(arch):
    from kvmsim.kvm.memslot import KVM_MEM
    host, kvm, vma, vcpu = make_vm("series", arch=arch, flags=int(KVM_MEM.READONLY))
    assert vcpu.read(1 << 30).exit == Exit.MMIO
    assert kvm.journal.counters["kvmppc_hv_emulate_mmio"] == 1
    assert kvm.arch.page_fault(vcpu, 0, True) == FaultRet.EMULATE
    assert kvm.journal.counters["kvmppc_core_queue_data_storage"] == 1


@pytest.mark.parametrize("arch,_,caller", HV_ARCHES)
def test_an_error_pfn_is_efault_with_nothing_put(arch, _, caller):
    """``if (is_error_noslot_pfn(pfn)) return -EFAULT;`` (a PROT_NONE VMA: GUP fails)."""
    host, kvm, vma, vcpu = make_vm("series", arch=arch)
    host.mm.mprotect(vma.start, 4096, "")
    assert kvm.arch.page_fault(vcpu, 0, False) == -14
    assert _facts(kvm, FactKind.PUT, caller) == []
