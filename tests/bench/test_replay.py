"""The VMM replays (kvmsim.bench.replay): each at a small size loses no page, the oracle catches a
broken harvest (through the VMM's ioctls, and through a broken model hook), and the numbers that
separate the protocols are the ones the series changed."""

import functools

import numpy as np
import pytest

from kvmsim.bench.replay import NAMES, ReplayOptions, replays, run_replay
from kvmsim.bench.replay import common
from kvmsim.bench.replay.common import WriteOracle
from kvmsim.errors import UsageError

SMALL = dict(memory=64 << 20, hot=16 << 20, dirty_rate=8 << 20, epochs=3, epoch_seconds=1.0, blobs=4)


def small(**kw) -> ReplayOptions:
    return ReplayOptions(**{**SMALL, **kw})


def test_every_name_is_registered():
    assert tuple(replays()) == NAMES


@pytest.mark.parametrize("name", [n for n in NAMES if n != "virtio-gpu-blobs"])
@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_dirty_tracking_replay_loses_nothing(name, policy):
    results = run_replay(name, small(), policy)
    assert results
    for r in results:
        assert r.guest_writes > 0, r.variant            # the guest did write while the VMM harvested
        assert r.pages_sent >= r.guest_writes
        assert r.pages_lost == 0, (r.variant, r.pages_lost)
        assert len(r.per_iteration) >= 2                # a first pass (or the base) and the last one


def test_qemu_precopy_converges_and_clears_per_chunk():
    (r,) = run_replay("qemu-precopy", small(clear_bitmap_shift=12), "series")    # 16 MiB chunks: 4 of them
    assert r.converged
    assert r.downtime_ms <= 300
    assert r.extra["clear_dirty_log_calls"] >= 4        # the first pass clears every chunk once
    assert r.per_iteration[0].reported == (64 << 20) >> 12     # INITIALLY_SET: the first pass is all memory


def test_qemu_precopy_does_not_converge_when_the_guest_outruns_the_link():
    (r,) = run_replay("qemu-precopy", small(dirty_rate=512 << 20, bandwidth=16 << 20, max_iterations=4), "series")
    assert r.converged is False and r.iterations == 4
    assert r.pages_lost == 0                            # stop-and-copy still sends everything


def test_dirty_ring_small_ring_exits_on_full():
    r4k, r64k = run_replay("qemu-dirty-ring", small(dirty_rate=16 << 20, bandwidth=32 << 20, max_iterations=3),
                           "series")
    assert (r4k.variant, r64k.variant) == ("ring 4096", "ring 65536")
    assert r4k.extra["ring_full_exits"] > 0
    assert r4k.extra["ring_full_exits"] > r64k.extra["ring_full_exits"]
    assert r4k.extra["reaped_entries"] > 0 and r4k.extra["reaper_wakeups"] > 0
    assert r4k.pages_lost == r64k.pages_lost == 0


def test_legacy_marks_folios_dirty_when_clearing_the_series_does_not():
    """"KVM: x86/mmu: Mark folio dirty when creating SPTE, not when zapping/modifying": legacy's
    CLEAR_DIRTY_LOG marks every re-protected page's folio dirty, the series none."""
    legacy = run_replay("qemu-precopy", small(), "legacy")[0]
    series = run_replay("qemu-precopy", small(), "series")[0]
    assert legacy.counters["set_dirty"] > 0
    assert series.counters.get("set_dirty", 0) == 0
    assert legacy.pages_sent == series.pages_sent       # same workload, same harvest


def test_no_pml_write_protects_so_writes_fault():
    pml = run_replay("ch-precopy", small(), "series")[0]
    svm = run_replay("ch-precopy", small(pml=False), "series")[0]
    assert pml.faults == 0
    assert svm.faults > 0 and svm.pages_lost == 0


def test_snapshot_chain_without_clear_over_reports_everything():
    by = {r.variant: r for r in run_replay("snapshot-chain", small(), "series")}
    n = (64 << 20) >> 12
    assert by["get"].pages_over_reported == 0
    stale = by["initially-set, no clear"]
    assert stale.pages_lost == 0
    assert all(it.reported == n for it in stale.per_iteration)        # every delta is the whole memory
    # one guest run per epoch writes distinct pages: everything else in the delta was clean
    assert stale.pages_over_reported == 3 * n - sum(it.guest_writes for it in stale.per_iteration)


#: A guest that dirties 24 MiB/s of its 64 MiB on a 32 MiB/s link: passes shrink by about a quarter each.
BUSY = dict(hot=64 << 20, dirty_rate=24 << 20, bandwidth=32 << 20)


def test_ch_does_at_most_five_passes_up_to_v51():
    by = {r.variant: r for r in run_replay("ch-precopy", small(**BUSY), "series")}
    for v in ("get, 5 passes", "initially-set"):
        assert by[v].iterations == 5
        assert len(by[v].per_iteration) == 7            # the full copy, 5 passes, the last batch while paused
    assert by["get, 5 passes"].downtime_ms > 300        # 5 passes do not get this guest under 300 ms


def test_ch_v52_iterates_until_the_downtime_fits():
    by = {r.variant: r for r in run_replay("ch-precopy", small(**BUSY), "series")}
    r = by["get, downtime"]
    assert r.converged and r.iterations > 5
    assert r.pages_lost == 0
    slow = run_replay("ch-precopy", small(dirty_rate=512 << 20, bandwidth=16 << 20, max_iterations=6), "series")
    r = {x.variant: x for x in slow}["get, downtime"]
    assert r.converged is False and r.iterations == 6 and r.pages_lost == 0


# ---- the oracle catches broken harvests -----------------------------------------------------------------

@pytest.mark.parametrize("name,bug,kw", [
    ("qemu-precopy", "send-before-clear", {}),
    # writes between a sync's GET and a later chunk's CLEAR need a pass that is neither the first nor the last
    ("qemu-precopy", "clear-unmasked", {"clear_bitmap_shift": 12, "hot": 64 << 20, "dirty_rate": 64 << 20,
                                        "bandwidth": 64 << 20, "max_iterations": 3}),
    ("ch-precopy", "clear-after-send", {}),
    ("snapshot-chain", "resume-before-reset", {}),
])
def test_oracle_catches_a_broken_vmm_harvest(name, bug, kw):
    clean = run_replay(name, small(**kw), "series")
    assert all(r.pages_lost == 0 for r in clean)
    broken = run_replay(name, small(bug=bug, **kw), "series")
    assert any(r.pages_lost > 0 for r in broken), [(r.variant, r.pages_lost) for r in broken]


def test_oracle_catches_a_kernel_that_skips_rearming_a_chunk(monkeypatch):
    """Break the model itself: the arch's ``enable_log_dirty_pt_masked`` (what KVM_CLEAR_DIRTY_LOG and a
    harvesting GET re-arm through) skips the second 16 MiB of the slot.  Writes there after a harvest
    are never logged again, and the oracle must see them missing."""
    real_build = common.build_vm

    def build_broken(*a, **kw):
        vm = real_build(*a, **kw)
        arch = vm.kvm.arch
        rearm = arch.enable_log_dirty_pt_masked

        def skip_chunk(slot, lo, mask):
            mask = np.array(mask, dtype=bool)
            hole = slice(max(0, 4096 - lo), max(0, 8192 - lo))
            mask[hole] = False
            if mask.any():
                rearm(slot, lo, mask)
        arch.enable_log_dirty_pt_masked = skip_chunk
        return vm

    import kvmsim.bench.replay.ch as ch
    monkeypatch.setattr(ch, "build_vm", build_broken)
    results = run_replay("ch-precopy", small(**BUSY), "series")
    assert all(r.pages_lost > 0 for r in results), [(r.variant, r.pages_lost) for r in results]


def test_write_oracle_counts_over_reported_and_lost():
    o = WriteOracle(8, owed=False)
    o.wrote(2, np.array([True, True, False]))
    assert o.send(0, np.array([False, False, True, False, True, False, False, False])) == 1  # page 4 was clean
    assert o.lost() == 1                                # page 3 never sent
    assert o.over == 1 and o.sent == 2 and o.writes == 2


# ---- virtio-gpu blobs ------------------------------------------------------------------------------------

@functools.cache
def _gpu(policy):
    return {(r.arch, r.variant): r for r in run_replay("virtio-gpu-blobs", small(), policy)}


def test_gpu_blobs_ttm_legacy_efaults_and_refs_the_head_page_series_maps_all():
    legacy, series = _gpu("legacy"), _gpu("series")
    assert set(legacy) == {(a, b) for a in ("x86", "arm64", "riscv") for b in ("dmabuf", "ttm", "gem-shmem", "memfd")}
    for arch in ("x86", "arm64", "riscv"):
        lt, st = legacy[(arch, "ttm")], series[(arch, "ttm")]
        assert lt.extra["efault"] > 0 and lt.extra["failed_blobs"] == lt.iterations
        assert lt.extra["foreign_refs"] == lt.iterations            # one head page per blob (INV-1a)
        assert lt.counters["get_page"] == lt.iterations
        assert st.extra["efault"] == 0 and st.extra["violations"] == {}
        assert st.counters.get("get_page", 0) == 0 and st.counters.get("put_page", 0) == 0


def test_gpu_blobs_dmabuf_readonly_pte_writes_efault_on_arm64_and_riscv_in_both():
    for by in (_gpu("legacy"), _gpu("series")):
        assert by[("x86", "dmabuf")].extra["efault"] == 0            # RET_PF_EMULATE: the store lands
        for arch in ("arm64", "riscv"):
            r = by[(arch, "dmabuf")]
            assert r.extra["exits"]["read"].get("efault", 0) == 0
            assert r.extra["exits"]["write"]["efault"] == r.params["blob_bytes_total"] >> 12


def test_gpu_blobs_gem_shmem_legacy_refs_every_page_it_does_not_own():
    legacy, series = _gpu("legacy"), _gpu("series")
    for arch in ("x86", "arm64", "riscv"):
        lg, sg = legacy[(arch, "gem-shmem")], series[(arch, "gem-shmem")]
        pages = lg.params["blob_bytes_total"] >> 12
        assert lg.extra["efault"] == sg.extra["efault"] == 0
        assert lg.counters["get_page"] == lg.counters["put_page"] == pages       # kvm_try_get_pfn() per page
        assert lg.extra["foreign_refs"] == pages
        assert sg.counters.get("get_page", 0) == 0 and sg.extra["violations"] == {}


def test_gpu_blobs_memfd_works_everywhere():
    for by in (_gpu("legacy"), _gpu("series")):
        for arch in ("x86", "arm64", "riscv"):
            r = by[(arch, "memfd")]
            assert r.extra["efault"] == 0 and r.counters["get_page"] == r.counters["put_page"] > 0


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError, match="--hot"):
        run_replay("qemu-precopy", small(hot=1 << 40), "series")
    with pytest.raises(UsageError, match="--bug"):
        run_replay("qemu-dirty-ring", small(bug="send-before-clear"), "series")
    with pytest.raises(UsageError, match="ring-entries"):
        run_replay("qemu-dirty-ring", small(ring_entries=(3000,)), "series")
    with pytest.raises(UsageError, match="unknown replay"):
        run_replay("qemu-postcopy", small(), "series")
