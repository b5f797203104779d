"""Spec §2.0.6 as a table: for every pfn class × VMA kind × read/write fault × policy, the resolution
result, the references KVM holds after the fault and after release, and the page flags it touched."""

import pytest

from kvmsim.kvm.pfn import KVM_PFN_ERR_FAULT, _kvm_faultin_pfn, kvm_release_faultin, pfn_name
from kvmsim.mm.gup import FOLL
from kvmsim.mm.vma import VmaKind

from tests.helpers import make_vm

GPA = 1 << 30

# backing: how to build it; (kind, driver kwargs or None)
BACKINGS = {
    "anon-untouched": (VmaKind.ANON, None),
    "anon-shared": (VmaKind.ANON_SHARED, None),
    "memfd": (VmaKind.MEMFD, None),
    "hugetlb-2m": (VmaKind.HUGETLB, None),
    "pfnmap-no_page": (VmaKind.PFNMAP, dict(pfn_class="no_page")),
    "pfnmap-reserved": (VmaKind.PFNMAP, dict(pfn_class="reserved")),
    "pfnmap-nonrefcounted-tail": (VmaKind.PFNMAP, dict(pfn_class="nonrefcounted", order=2, compound=False)),
    "pfnmap-driver_refcounted": (VmaKind.PFNMAP, dict(pfn_class="driver_refcounted")),
    "pfnmap-compound-tail": (VmaKind.PFNMAP, dict(pfn_class="normal", order=2, compound=True)),
    "mixedmap-normal": (VmaKind.MIXEDMAP, dict(pfn_class="normal", mixed=True)),
    "mixedmap-zone_device": (VmaKind.MIXEDMAP, dict(pfn_class="zone_device", mixed=True)),
}

# (backing, write, policy) -> (result, held_after_fault, held_after_release, dirty_by_kvm, accessed_by_kvm)
# result: "page" (a pfn with a struct page), "zero", "nopage" (no struct page) or an error pfn name.
# held_*: KVM's references on the page (refcount delta it caused).
E = {}
for pol in ("legacy", "series"):
    series = pol == "series"
    E[("anon-untouched", False, pol)] = ("zero", 1, 0, False, False)          # zero page is PG_reserved
    E[("anon-untouched", True, pol)] = ("page", 1, 0, series, True)           # series dirties at map time
    E[("anon-shared", False, pol)] = ("page", 1, 0, series, True)             # read fault upgraded to writable
    E[("anon-shared", True, pol)] = ("page", 1, 0, series, True)
    E[("memfd", False, pol)] = ("page", 1, 0, series, True)
    E[("memfd", True, pol)] = ("page", 1, 0, series, True)
    E[("hugetlb-2m", False, pol)] = ("page", 1, 0, series, True)
    E[("hugetlb-2m", True, pol)] = ("page", 1, 0, series, True)
    for w in (False, True):
        E[("pfnmap-no_page", w, pol)] = ("nopage", 0, 0, False, False)
        E[("pfnmap-reserved", w, pol)] = ("page", 0, 0, False, False)
        # legacy: get_page_unless_zero() on a refcount-0 tail fails -> EFAULT; series maps it untouched
        E[("pfnmap-nonrefcounted-tail", w, pol)] = ("page", 0, 0, False, False) if series else ("FAULT", 0, 0, False, False)
        E[("pfnmap-compound-tail", w, pol)] = ("page", 0, 0, False, False) if series else ("FAULT", 0, 0, False, False)
        # legacy takes and drops a reference on the driver's page (and ages it); series never touches it
        E[("pfnmap-driver_refcounted", w, pol)] = ("page", 0, 0, False, False) if series else ("page", 1, 0, False, True)
        E[("mixedmap-normal", w, pol)] = ("page", 1, 0, series, True)
        E[("mixedmap-zone_device", w, pol)] = ("page", 1, 0, False, False)     # PG_reserved: never aged/dirtied


def _backing(host, name):
    kind, drv = BACKINGS[name]
    size = 2 << 20 if name == "hugetlb-2m" else 8 * 4096
    driver = None
    if drv is not None:
        drv = dict(drv)
        cls = drv.pop("pfn_class")
        driver = host.add_driver(name, size // 4096, cls, **drv)
    vma = host.mm.mmap(size, kind, driver=driver, page_size=(2 << 20) if kind == VmaKind.HUGETLB else 4096)
    return vma


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("backing", list(BACKINGS))
def test_resolution_row(backing, write, policy):
    host, kvm, _, _ = make_vm(policy)
    vma = _backing(host, backing)
    kvm.set_user_memory_region(1, GPA, vma.end - vma.start, vma.start)
    slot = kvm.gfn_to_memslot(GPA >> 12)
    gfn = (GPA >> 12) + 1                                            # page 1: a tail in the order-2 chunks
    expect = E[(backing, write, policy)]
    phys = host.phys
    pfn, kfp = _kvm_faultin_pfn(kvm, slot, gfn, FOLL.WRITE if write else FOLL(0))
    if expect[0] in ("FAULT",):
        assert pfn_name(pfn) == expect[0]
        assert pfn == KVM_PFN_ERR_FAULT
        assert not kvm.host_refs
        return
    kind = "zero" if pfn == phys.zero_pfn else ("page" if phys.pfn_valid(pfn) else "nopage")
    assert kind == expect[0], pfn_name(pfn)
    held = sum(n for (p, _), n in kvm.host_refs.items())
    assert held == expect[1]
    before = len(host.journal.facts)
    kvm.mmu_lock.write_lock()
    if kvm.policy.release_under_mmu_lock:
        kvm_release_faultin(kvm, pfn, kfp, unused=False, dirty=kfp.map_writable, caller="kvm_release_faultin_page")
    kvm.mmu_lock.write_unlock()
    if not kvm.policy.release_under_mmu_lock:
        kvm_release_faultin(kvm, pfn, kfp, unused=False, dirty=kfp.map_writable, caller="kvm_release_pfn_clean")
    held_after = sum(n for (p, _), n in kvm.host_refs.items())
    assert held_after == expect[2]
    kvm_facts = [f for f in host.journal.facts[before:] if f.kvm]
    assert any(f.kind == "set_dirty" for f in kvm_facts) == expect[3]
    assert any(f.kind == "mark_accessed" for f in kvm_facts) == expect[4]
    # the model's ground truth and the series' report agree; legacy reports nothing
    if policy == "series":
        assert kfp.refcounted_page == kfp.held
    else:
        assert kfp.refcounted_page is None
    # after release the page's refcount is back where the owner left it
    if kind == "page" and phys.pfn_valid(pfn):
        assert not phys.is_poisoned(pfn)


def test_refcount_untouched_under_series_for_driver_pages():
    for backing in ("pfnmap-nonrefcounted-tail", "pfnmap-driver_refcounted", "pfnmap-compound-tail"):
        host, kvm, _, _ = make_vm("series")
        vma = _backing(host, backing)
        kvm.set_user_memory_region(1, GPA, vma.end - vma.start, vma.start)
        vcpu = kvm.create_vcpu()
        before = host.phys.refcount.copy()
        for i in range(vma.npages):
            assert vcpu.write(GPA + i * 4096, i).ok
        assert (host.phys.refcount == before).all()
        assert not [f for f in host.journal.facts if f.kvm and f.kind in ("get", "put", "pin", "unpin")]
