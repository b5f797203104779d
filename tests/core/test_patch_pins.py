"""Pins for legacy/series differences that were modelled but not asserted (series-patch-map.md rows 14,
29, 38/41), and the 64-page granularity of KVM_CLEAR_DIRTY_LOG.  Each test fails if the modelled
behaviour flips (legacy <-> series) or the rule is loosened."""

import errno

import pytest

from kvmsim.errors import ModelError
from kvmsim.kvm.dirty import enable_manual_protect, kvm_clear_dirty_log, kvm_get_dirty_log
from kvmsim.kvm.kvm import Kvm
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.kvm.pfn import KVM_PFN_ERR_FAULT, KVM_PFN_ERR_SIGPENDING, _kvm_faultin_pfn
from kvmsim.kvm.pfncache import GfnToPfnCache
from kvmsim.kvm.vcpu import Exit
from kvmsim.mm.gup import FOLL
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind

GPA = 1 << 30
PAGE = 4096


def _delta(kvm, before, key):
    return kvm.journal.counters.get(key, 0) - before.get(key, 0)


# ---- patch 14 "KVM: Return ERR_SIGPENDING from hva_to_pfn() if GUP returns -EGAIN" ------------------

@pytest.mark.parametrize("policy,pfn", [("legacy", KVM_PFN_ERR_FAULT), ("series", KVM_PFN_ERR_SIGPENDING)])
def test_p14_gup_eagain_pfn(policy, pfn):
    """GUP's killable mmap_lock fails (-EAGAIN, fatal signal pending): v6.12 falls through to the VMA
    lookup and returns KVM_PFN_ERR_FAULT, v6.13 returns KVM_PFN_ERR_SIGPENDING (virt/kvm/kvm_main.c
    ``hva_to_pfn()``)."""
    host = Host()
    vma = host.mm.mmap(2 * PAGE, VmaKind.ANON_SHARED)
    kvm = Kvm(host, policy=policy, arch="generic")
    kvm.set_user_memory_region(1, GPA, 2 * PAGE, vma.start)
    host.mm.mmap_lock_contended = True
    got, _ = _kvm_faultin_pfn(kvm, kvm.gfn_to_memslot(GPA >> 12), GPA >> 12, FOLL.WRITE)
    assert got == pfn


@pytest.mark.parametrize("policy,exit_,err", [("legacy", Exit.EFAULT, errno.EFAULT), ("series", Exit.EINTR, errno.EINTR)])
def test_p14_x86_kvm_run_exit(policy, exit_, err):
    """x86 ``kvm_handle_error_pfn()``: SIGPENDING is -EINTR (a signal exit), any other error pfn -EFAULT."""
    host = Host()
    vma = host.mm.mmap(2 * PAGE, VmaKind.ANON_SHARED)
    kvm = Kvm(host, policy=policy, arch="x86")
    kvm.set_user_memory_region(1, GPA, 2 * PAGE, vma.start)
    vcpu = kvm.create_vcpu()
    host.mm.mmap_lock_contended = True
    a = vcpu.write(GPA, 1)
    assert (a.exit, a.errno) == (exit_, err)
    host.mm.mmap_lock_contended = False
    assert vcpu.write(GPA, 1).ok


# ---- patch 29 "KVM: pfncache: Precisely track refcounted pages" ---------------------------------------

@pytest.mark.parametrize("policy,accessed", [("legacy", 2), ("series", 1)])
def test_p29_pfncache_retry_marks_accessed(policy, accessed):
    """``hva_to_pfn_retry()`` with one retry forced by a racing MADV_DONTNEED: v6.12 releases with
    ``kvm_release_pfn_clean()`` on the retry and on success (two mark_accessed); v6.13 releases the
    retried page unused (put only) and the used one clean (one mark_accessed)."""
    host = Host()
    vma = host.mm.mmap(2 * PAGE, VmaKind.ANON)
    kvm = Kvm(host, policy=policy, arch="x86")
    kvm.set_user_memory_region(1, GPA, 2 * PAGE, vma.start)
    host.mm.host_access(vma.start, True, 5)
    gpc = GfnToPfnCache(kvm)
    gpc.active, gpc.gpa = True, GPA
    before = dict(kvm.journal.counters)
    refresh = gpc.refresh_steps.steps()
    next(refresh)                                         # mmu_seq snapshot
    next(refresh)                                         # pfn resolved, not yet checked
    host.mm.madvise(vma.start, 2 * PAGE, "dontneed")       # invalidation: seq moves on
    with pytest.raises(StopIteration):
        while True:
            next(refresh)
    assert _delta(kvm, before, "gpc_refresh_retry") == 1 and gpc.valid
    assert _delta(kvm, before, "mark_accessed:hva_to_pfn_retry") == accessed
    assert _delta(kvm, before, "put_page:hva_to_pfn_retry") == 2          # both: every reference dropped


# ---- patches 38 "KVM: x86/mmu: Put direct prefetched pages via kvm_release_page_clean()" and
# ---- 41 "KVM: x86/mmu: Mark pages/folios dirty at the origin of make_spte()" ----------------------------

@pytest.mark.parametrize("policy,marked", [("legacy", 0), ("series", 7)])
def test_p38_p41_direct_prefetch_release(policy, marked):
    """``direct_pte_prefetch_many()``: v6.12 ``put_page()`` only; v6.13 ``kvm_release_page_dirty()``
    (dirty + accessed + put) for each of the 7 prefetched neighbours of a shadow-MMU fault."""
    host = Host()
    vma = host.mm.mmap(8 * PAGE, VmaKind.ANON_SHARED)
    for i in range(8):
        host.mm.host_access(vma.start + i * PAGE, True, i)         # present host PTEs: GUP-fast succeeds
    kvm = Kvm(host, policy=policy, arch="x86", mmu="shadow")
    kvm.set_user_memory_region(1, GPA, 8 * PAGE, vma.start)
    vcpu = kvm.create_vcpu()
    before = dict(kvm.journal.counters)
    assert vcpu.read(GPA).ok
    assert _delta(kvm, before, "prefetch") == 7
    assert _delta(kvm, before, "put_page:direct_pte_prefetch_many") == 7
    assert _delta(kvm, before, "set_dirty:direct_pte_prefetch_many") == marked
    assert _delta(kvm, before, "mark_accessed:direct_pte_prefetch_many") == marked


# ---- KVM_CLEAR_DIRTY_LOG granularity: 64 pages (one bitmap word) -----------------------------------------

@pytest.fixture
def manual_vm():
    host = Host()
    kvm = Kvm(host, policy="series", arch="x86")
    enable_manual_protect(kvm, 1)
    vma = host.mm.mmap(200 * PAGE, VmaKind.ANON_SHARED)
    kvm.set_user_memory_region(1, GPA, 200 * PAGE, vma.start, KVM_MEM.LOG_DIRTY_PAGES)
    vcpu = kvm.create_vcpu()
    for p in range(200):
        vcpu.write(GPA + p * PAGE, 1)
    return kvm


@pytest.mark.parametrize("first,num", [(32, 32), (0, 32), (0, 96), (96, 64), (1, 63), (64, 100)])
def test_clear_dirty_log_rejects_what_a_32_page_rule_would_take(manual_vm, first, num):
    """``kvm_clear_dirty_log_protect()``: ``first_page & 63`` or ``num_pages & 63`` short of the slot end
    is EINVAL (virt/kvm/kvm_main.c); a 32-page rule would accept the first four, and (64, 100)
    runs past the 200-page slot."""
    with pytest.raises(ModelError) as e:
        kvm_clear_dirty_log(manual_vm, 1, first, num)
    assert e.value.errno == errno.EINVAL
    assert kvm_get_dirty_log(manual_vm, 1).all()                     # nothing was cleared


@pytest.mark.parametrize("first,num,left", [(64, 64, 136), (128, 72, 128), (192, 8, 192), (0, 200, 0)])
def test_clear_dirty_log_accepts_words_and_the_slot_tail(manual_vm, first, num, left):
    """64-aligned ranges, and a last range that ends exactly at the slot end whatever its length."""
    kvm_clear_dirty_log(manual_vm, 1, first, num)
    log = kvm_get_dirty_log(manual_vm, 1)
    assert int(log.sum()) == left
    assert not log[first:first + num].any()
