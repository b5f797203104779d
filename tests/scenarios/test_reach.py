"""Every knob of the model is a scenario key, and each one reaches the model: the same scenario with
the key on and off gives a different observable outcome (a step's result or errno, a counter, an SPTE).

Keys: [vm] ad_enabled, eager_split, slot_zap_all, pml, nx_huge_pages (+ exec on a fault step),
v613_other (the other 6.13 MMU changes, resolved from the policy; false = "series only"),
dirty_ring_with_bitmap; [[vma]] io (VM_MIXEDMAP|VM_IO); step args signal_pending (patch 14); ops
memory_failure (KVM_PFN_ERR_HWPOISON), enable_dirty_ring (its size errno), enable_dirty_ring_with_bitmap.
"""

from __future__ import annotations

import pytest

from kvmsim.errors import ScenarioError
from kvmsim.scenarios import loader
from kvmsim.scenarios.runner import build, run
from kvmsim.scenarios.spec import Scenario


def _sc(vm: dict, steps: list, *, vma: dict | None = None, flags=(), driver: dict | None = None) -> Scenario:
    vma = vma or {"kind": "anon", "size": "16K"}
    b = Scenario.builder("reach")
    if driver:
        b.driver("drv", **driver)
    b.vma("ram", **vma).vm(**vm).memslot(id=0, gpa=0, size=vma["size"], vma="ram", flags=list(flags))
    for op, kw in steps:
        b.step(op, **kw)
    return b.build()


def _steps(rr):
    return [(s.res.result, s.res.errno_name) for s in rr.steps]


# ---- x86 MMU knobs ------------------------------------------------------------------------------------

def test_ad_enabled_false_makes_aging_access_track_and_push_dirty():
    steps = [("host_write", {"vma": "ram"}), ("write", {"gpa": 0}),
             ("age", {"vma": "ram", "size": "4K", "how": "clear_young"}), ("read", {"gpa": 0})]
    on, off = (run(_sc({"policy": "legacy", "ad_enabled": ad}, steps), "legacy") for ad in (True, False))
    assert build(_sc({"policy": "legacy", "ad_enabled": False}, steps), "legacy").kvm.arch.ad_enabled is False
    # A/D disabled: the write-protected SPTE is made writable by a fast page fault, and legacy's aging
    # pushes the SPTE's "dirty" (its W bit) into the folio
    assert on.counters.get("fast_page_fault", 0) == 0 and off.counters["fast_page_fault"] == 1
    assert on.counters.get("kvm_set_dirty", 0) == 0 and off.counters["kvm_set_dirty"] == 1
    assert "INV-2" in off.by_invariant() and "INV-2" not in on.by_invariant()


def test_eager_split_splits_a_huge_leaf_when_logging_is_enabled_only_when_on():
    steps = [("write", {"gpa": 0}), ("memslot_flags", {"id": 0, "flags": ["log_dirty_pages"]})]
    vma = {"kind": "anon", "size": "4M", "thp": True}
    on, off = (run(_sc({"policy": "series", "eager_split": e}, steps, vma=vma), "series") for e in (True, False))
    assert on.steps[1].counters["split"] == 1 and on.steps[1].counters["spte_write"] == 513
    assert off.steps[1].counters.get("split", 0) == 0


def test_slot_zap_all_quirk_zaps_every_slot_on_delete():
    def sc(z):
        b = Scenario.builder("t").vma("ram", kind="anon", size="32K").vm(policy="series", slot_zap_all=z)
        b.memslot(id=0, gpa=0, size="16K", vma="ram").memslot(id=1, gpa=0x10000, size="16K", vma="ram", offset="16K")
        b.step("write", gpa=0).step("write", gpa=0x10000).step("memslot_delete", id=0).step("read", gpa=0x10000)
        return b.build()
    on, off = run(sc(True), "series"), run(sc(False), "series")
    # KVM_X86_QUIRK_SLOT_ZAP_ALL: kvm_mmu_zap_all_fast() drops slot 1's SPTE too, so its read faults again
    assert on.steps[2].counters["mmu_zap_all_fast"] == 1 and on.steps[2].counters["spte_zap"] == 2
    assert on.steps[3].counters["page_fault"] == 1
    assert off.steps[2].counters.get("mmu_zap_all_fast", 0) == 0 and off.steps[2].counters["spte_zap"] == 1
    assert off.steps[3].counters.get("page_fault", 0) == 0


def test_pml_off_write_protects_4k_so_a_logged_write_takes_a_fast_page_fault():
    steps = [("write", {"gpa": 0}), ("memslot_flags", {"id": 0, "flags": ["log_dirty_pages"]}), ("write", {"gpa": 0})]
    on, off = (run(_sc({"policy": "series", "pml": p}, steps), "series") for p in (True, False))
    assert on.steps[2].counters.get("fast_page_fault", 0) == 0
    assert off.steps[2].counters["fast_page_fault"] == 1


def test_nx_huge_pages_maps_an_exec_fault_4k_and_only_an_exec_fault():
    vma = {"kind": "anon", "size": "4M", "thp": True}
    steps = [("fault", {"gpa": 0, "exec": True}), ("read", {"gpa": 0x1000})]
    on, off = (run(_sc({"policy": "series", "nx_huge_pages": nx}, steps, vma=vma), "series") for nx in (True, False))
    assert on.steps[0].counters["nx_huge_page_disallowed"] == 1
    assert on.steps[1].counters["page_fault"] == 1              # the neighbour is not under a 2M leaf
    assert off.steps[1].counters.get("page_fault", 0) == 0      # the exec fault mapped 2M
    data = run(_sc({"policy": "series", "nx_huge_pages": True}, [("fault", {"gpa": 0}), ("read", {"gpa": 0x1000})],
                   vma=vma), "series")
    assert data.steps[1].counters.get("page_fault", 0) == 0     # a data fault still maps 2M


def test_x86_only_keys_are_refused_for_another_arch_with_file_and_line():
    text = 'name = "x"\n\n[vm]\narch = "arm64"\nnx_huge_pages = true\n'
    with pytest.raises(ScenarioError) as ei:
        loader.loads(text, file="k.toml")
    assert ei.value.line == 5 and "x86 MMU option" in str(ei.value) and "[vm.nx_huge_pages]" in str(ei.value)
    with pytest.raises(ScenarioError, match="an arm64 MMU option"):
        loader.loads('name = "x"\n\n[vm]\nipa_bits = 44\n', file="k.toml")


# ---- the other 6.13 MMU changes as part of the protocol --------------------------------------------------

@pytest.mark.parametrize("v613_other, policy, flushes", [
    (None, "legacy", 1), (None, "series", 0),           # full v6.12 vs full v6.13
    (False, "legacy", 1), (False, "series", 1),         # "series only": the 85 patches on a v6.12 base
    (True, "legacy", 0),
])
def test_v613_other_follows_the_policy_unless_the_file_says(v613_other, policy, flushes):
    vm = {"policy": policy} if v613_other is None else {"policy": policy, "v613_other": v613_other}
    rr = run(_sc(vm, [("write", {"gpa": 0}), ("age", {"vma": "ram", "size": "4K", "how": "clear_flush_young"})]),
             policy)
    assert rr.steps[1].counters.get("tlb_flush:clear_flush_young", 0) == flushes


def test_v613_other_default_resolves_from_kvm_ops():
    from kvmsim.kvm.kvm import Kvm
    from kvmsim.mm.host import Host
    assert Kvm(Host(), policy="series").v613_other is True
    assert Kvm(Host(), policy="series-rc1").v613_other is True
    assert Kvm(Host(), policy="legacy").v613_other is False
    assert Kvm(Host(), policy="pre-5.13").v613_other is False
    assert Kvm(Host(), policy="series", v613_other=False).v613_other is False
    assert Kvm(Host(), policy="series").ops.mmu_613_other is True


# ---- host memory ---------------------------------------------------------------------------------------

def test_memory_failure_makes_the_next_guest_access_hwpoison():
    steps = [("host_write", {"vma": "ram"}), ("write", {"gpa": 0}), ("memory_failure", {"vma": "ram"}),
             ("read", {"gpa": 0}), ("fault", {"gpa": 0})]
    rr = run(_sc({"policy": "series"}, steps), "series")
    assert rr.steps[2].counters["spte_zap"] == 1                # the mmu_notifier zapped the SPTE
    assert _steps(rr)[3:] == [("hwpoison", "EHWPOISON"), ("hwpoison", "EHWPOISON")]
    clean = run(_sc({"policy": "series"}, steps[:2] + steps[3:]), "series")
    assert _steps(clean)[2:] == [("ok", None), ("spurious", None)]


def test_memory_failure_of_a_driver_page_is_refused():
    drv = {"pfn_class": "normal", "mixed": True}
    rr = run(_sc({"policy": "series"}, [("memory_failure", {"vma": "ram"})], vma={"kind": "mixedmap", "size": "16K",
                                                                                   "driver": "drv"}, driver=drv), "series")
    assert _steps(rr) == [("error", "EINVAL")]


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_vma_io_sends_a_mixedmap_fault_down_the_remapped_path(policy):
    # the driver inserts its pages from its fault handler (prefault = false): GUP-fast finds no PTE (it never
    # looks at the VMA, so a present normal PTE would be taken even under VM_IO), and slow GUP's
    # check_vma_flags() refuses VM_IO, so hva_to_pfn() goes to hva_to_pfn_remapped()
    drv = {"pfn_class": "normal", "mixed": True, "prefault": False}
    def go(io):
        return run(_sc({"policy": policy}, [("write", {"gpa": 0})],
                       vma={"kind": "mixedmap", "size": "16K", "driver": "drv", "io": io}, driver=drv), policy)
    plain, io = go(False), go(True)
    assert plain.counters.get("follow_pfnmap", 0) == 0 and io.counters["follow_pfnmap"] >= 1
    # GUP takes (and the fault drops) a reference on the normal page in both; through VM_IO only legacy's
    # kvm_try_get_pfn() does
    assert plain.counters["kvm_get"] == 1
    assert io.counters.get("kvm_get", 0) == (1 if policy == "legacy" else 0)


def test_vma_io_is_only_for_mixedmap():
    text = 'name = "x"\n\n[[vma]]\nname = "ram"\nkind = "anon"\nsize = "4K"\nio = true\n'
    with pytest.raises(ScenarioError) as ei:
        loader.loads(text, file="k.toml")
    assert ei.value.line == 7 and "mixedmap" in str(ei.value)


# ---- a fatal signal during GUP (patch 14) ---------------------------------------------------------------

@pytest.mark.parametrize("policy, want", [("legacy", ("efault", "EFAULT")), ("series", ("eintr", "EINTR"))])
def test_signal_pending_on_a_fault_step(policy, want):
    def go(sig):
        return _steps(run(_sc({"policy": policy}, [("fault", {"gpa": 0, "write": True, "signal_pending": sig})]),
                          policy))
    assert go(True) == [want]
    assert go(False) == [("fixed", None)]


def test_signal_pending_does_not_stop_gup_fast():
    # the host PTE is present and writable: GUP-fast takes it without mmap_lock, the signal is not seen
    rr = run(_sc({"policy": "series"}, [("host_write", {"vma": "ram"}),
                                          ("fault", {"gpa": 0, "write": True, "signal_pending": True})]), "series")
    assert _steps(rr)[1] == ("fixed", None)


# ---- dirty ring -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, errno_name", [
    (0, "EINVAL"), (1000, "EINVAL"), (2048, "EINVAL"),          # not a power of two / under a page
    (1 << 21, "E2BIG"),                                          # over KVM_DIRTY_RING_MAX_ENTRIES entries
    (4096, "EINVAL"),                                            # valid, but the vCPU already exists
])
def test_enable_dirty_ring_size_errno(size, errno_name):
    rr = run(_sc({"policy": "series"}, [("enable_dirty_ring", {"size": size})]), "series")
    assert _steps(rr) == [("error", errno_name)]


def test_dirty_ring_vm_key_with_a_bad_size_is_a_setup_error():
    rr = run(_sc({"policy": "series", "dirty_ring": 1 << 21}, []), "series")
    assert rr.verdict == "error" and "KVM_DIRTY_RING_MAX_ENTRIES" in rr.error


def test_dirty_ring_with_bitmap_keeps_get_dirty_log_on_arm64():
    steps = [("write", {"gpa": 0}), ("get_dirty_log", {"slot": 0})]
    def go(bitmap):
        vm = {"policy": "series", "arch": "arm64", "dirty_ring": 4096, "dirty_ring_with_bitmap": bitmap}
        return run(_sc(vm, steps, flags=["log_dirty_pages"]), "series")
    with_bitmap, ring_only = go(True), go(False)
    assert _steps(ring_only)[1] == ("error", "ENXIO")
    assert _steps(with_bitmap)[1][1] is None and with_bitmap.verdict == "clean"


def test_dirty_ring_with_bitmap_is_refused_on_x86_and_without_a_ring():
    rr = run(_sc({"policy": "series", "dirty_ring": 4096, "dirty_ring_with_bitmap": True}, []), "series")
    assert rr.verdict == "error" and "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP" in rr.error
    with pytest.raises(ScenarioError, match="needs dirty_ring"):
        _sc({"policy": "series", "arch": "arm64", "dirty_ring_with_bitmap": True}, [])
    step = run(_sc({"policy": "series", "arch": "arm64", "dirty_ring": 4096}, [("enable_dirty_ring_with_bitmap", {})]),
               "series")
    assert _steps(step) == [("error", "EINVAL")]                 # a memslot exists already


# ---- async page faults (NEEDS_IO) -----------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_async_pf_turns_a_fault_on_a_page_that_needs_io_into_a_retry(policy):
    vma = {"kind": "file", "size": "16K"}
    # the first reclaim pass finds the page young (folio_referenced clears it), the second evicts it
    steps = [("host_write", {"vma": "ram"}), ("reclaim", {"vma": "ram"}), ("reclaim", {"vma": "ram"}),
             ("fault", {"gpa": 0, "write": True}), ("fault", {"gpa": 0, "write": True})]
    def go(apf):
        return run(_sc({"policy": policy, "async_pf": apf}, steps, vma=vma), policy)
    on, off = go(True), go(False)
    assert on.steps[2].counters["reclaimed"] == 1
    # KVM_PFN_ERR_NEEDS_IO (v6.13) or *async (v6.12): with async #PF the fault retries and the worker reads
    # the page in; without it the vCPU resolves again, blocking, and maps the page at once
    assert _steps(on)[3:] == [("retry", None), ("fixed", None)]
    assert on.steps[3].counters["async_pf"] == 1 and on.steps[3].counters.get("spte_write", 0) == 0
    assert _steps(off)[3:] == [("fixed", None), ("spurious", None)]
    assert off.steps[3].counters.get("async_pf", 0) == 0


# ---- [host]: the host kernel's mm settings ---------------------------------------------------------------

def _host_sc(host: dict, steps: list, vma: dict) -> Scenario:
    b = Scenario.builder("h").host(**host).vma("ram", **vma).vm(policy="series")
    b.memslot(id=0, gpa=0, size=vma["size"], vma="ram")
    for op, kw in steps:
        b.step(op, **kw)
    return b.build()


THP = {"kind": "anon", "size": "4M", "thp": True}


def test_host_thp_zero_page_off_allocates_a_thp_on_a_guest_read():
    on, off = (run(_host_sc({"thp_zero_page": z}, [("read", {"gpa": 0})], THP), "series") for z in (True, False))
    assert on.counters.get("host_huge_alloc", 0) == 0 and off.counters["host_huge_alloc"] == 1


def test_host_kernel_612_splits_the_huge_zero_pmd_on_a_write():
    steps = [("host_read", {"vma": "ram"}), ("host_write", {"vma": "ram"})]
    old, new = (run(_host_sc({"kernel": k}, steps, THP), "series") for k in ("6.12", "6.13"))
    assert old.steps[1].counters["thp_split"] == 1 and old.steps[1].counters.get("host_huge_alloc", 0) == 0
    assert new.steps[1].counters["host_huge_alloc"] == 1 and new.steps[1].counters.get("thp_split", 0) == 0


def test_host_without_swap_keeps_anonymous_memory_on_pageout():
    steps = [("write", {"gpa": 0}), ("madvise", {"vma": "ram", "advice": "pageout"}), ("read", {"gpa": 0})]
    on, off = (run(_host_sc({"swap": s}, steps, {"kind": "anon", "size": "16K"}), "series") for s in (True, False))
    assert on.steps[1].counters["reclaimed"] == 1 and on.steps[2].counters["page_fault"] == 1
    assert off.steps[1].counters.get("reclaimed", 0) == 0 and off.steps[2].counters.get("page_fault", 0) == 0


def test_host_table_is_checked_with_file_and_line():
    with pytest.raises(ScenarioError) as ei:
        loader.loads('name = "x"\n\n[host]\nkernel = "6.11"\n', file="h.toml")
    assert ei.value.line == 4 and "6.12, 6.13" in str(ei.value)
    with pytest.raises(ScenarioError) as ei:
        loader.loads('name = "x"\n\n[host]\nswapp = false\n', file="h.toml")
    assert ei.value.line == 4 and "unknown key 'swapp'" in str(ei.value)


def test_maxphyaddr_bounds_a_memslot():
    def go(bits):
        b = Scenario.builder("m").vma("ram", kind="anon", size="16K").vm(policy="series", maxphyaddr=bits)
        b.step("memslot_set", id=0, gpa=1 << 40, size="16K", vma="ram")
        return _steps(run(b.build(), "series"))
    assert go(36) == [("error", "EINVAL")]          # 1 TiB is past a 36-bit guest physical address space
    assert go(46) == [("create", None)]


def test_series_only_policy_is_the_series_without_the_other_613_changes():
    steps = [("write", {"gpa": 0}), ("age", {"vma": "ram", "size": "4K", "how": "clear_flush_young"})]
    sc = _sc({"policy": ["legacy", "series-only", "series"]}, steps)
    assert sc.policies == ("legacy", "series-only", "series")
    legacy, only, full = (run(sc, p) for p in sc.policies)
    flushes = [r.steps[1].counters.get("tlb_flush:clear_flush_young", 0) for r in (legacy, only, full)]
    assert flushes == [1, 1, 0]                          # v6.12's aging flush stays in "series only"
    # the struct-page protocol is the series' in both: the fault is released under mmu_lock, dirty
    assert only.counters["set_dirty:kvm_release_faultin_page"] == full.counters["set_dirty:kvm_release_faultin_page"] == 1
    assert "set_dirty:kvm_release_faultin_page" not in legacy.counters


@pytest.mark.parametrize("arch, key, small, large, gpa, errno_name", [
    ("arm64", "ipa_bits", 36, 44, 1 << 40, "EFAULT"),            # kvm_arch_prepare_memory_region(): past kvm_phys_size
    ("loongarch", "cpu_vabits", 40, 48, 1 << 40, "ENOMEM"),       # past gpa_size = 1 << (cpu_vabits - 1)
    ("riscv", "gstage_pgd_levels", 3, 4, 1 << 42, "EFAULT"),     # past Sv39x4's 41 bits
])
def test_arch_address_width_keys_bound_a_memslot(arch, key, small, large, gpa, errno_name):
    def go(v):
        b = Scenario.builder("w").vma("ram", kind="anon", size="16K").vm(policy="series", arch=arch, **{key: v})
        b.step("memslot_set", id=0, gpa=gpa, size="16K", vma="ram")
        return _steps(run(b.build(), "series"))
    assert go(small) == [("error", errno_name)]
    assert go(large) == [("create", None)]


@pytest.mark.parametrize("err, errno_name", [("enomem", "ENOMEM"), ("eexist", "EEXIST")])
def test_gstage_set_pte_error_fails_the_next_riscv_map(err, errno_name):
    steps = [("host_write", {"vma": "ram"}), ("gstage_set_pte_error", {"errno": err}), ("write", {"gpa": 0}),
             ("write", {"gpa": 0})]
    rr = run(_sc({"policy": "series", "arch": "riscv"}, steps), "series")
    assert _steps(rr)[2:] == [("efault", errno_name), ("ok", None)]          # one-shot
    assert rr.steps[2].counters.get("spte_write", 0) == 0 and rr.steps[3].counters["spte_write"] == 1
    other = run(_sc({"policy": "series"}, steps[1:2]), "series")
    assert _steps(other) == [("error", "EINVAL")]                            # not RISC-V
