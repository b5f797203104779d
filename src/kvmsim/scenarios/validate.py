"""Checks a scenario gets after its tables have their shape: names resolve, expectations make sense.

:mod:`kvmsim.scenarios.loader` checks each table against its schema; this module checks what needs
the whole file: a step's ``vma``, ``driver``, ``vcpu`` and named ``kvm_vcpu_map``/``gfn_to_page``/
pfncache handles exist when the step runs; counter names are counters the model keeps; a step's
per-policy expectation names a policy the scenario runs; ``verdict`` and ``violations`` agree.
Anything wrong is a :class:`kvmsim.errors.ScenarioError` with file, line and key, at load time.

Counter names: the model's journal (:mod:`kvmsim.trace`) counts fixed events (``spte_write``,
``fault_retry``, ...) and per-caller families (``set_dirty:kvm_release_faultin_page``: the kernel
function that did it); the runner derives ``kvm_get`` .. ``kvm_mark_accessed`` from the facts.
``tests/scenarios/test_validate.py`` checks this list against every counter the model's source
names, so a counter added to the model without being added here fails a test, not a user.
"""

from __future__ import annotations

import difflib
import errno as _errno
import re
from typing import TYPE_CHECKING, Any

from kvmsim.uapi import Exit

if TYPE_CHECKING:
    from kvmsim.scenarios.spec import Scenario, Step

#: Counters the runner derives from the journal facts (``runner._derived``).
DERIVED_COUNTERS = ("kvm_get", "kvm_put", "kvm_pin", "kvm_unpin", "kvm_set_dirty", "kvm_mark_accessed")

#: Fixed-name counters the model's journal keeps (``journal.count(name)``).
MODEL_COUNTERS = frozenset({
    # stage-2 faults and SPTEs (kvm/stage2.py, x86/, arm64/, riscv/, loongarch/, mips/)
    "page_fault", "fault_retry", "guest_livelock", "fast_page_fault", "spurious", "mmio", "spte_write", "spte_zap",
    "spte_relax_perms", "access_flag_fault", "io_mem_abort", "prefetch", "split", "recover",
    "zap_collapsible", "mmu_zap_all_fast", "range_access_exit", "inv11", "emulated_mmio_fallback",
    "kvm_riscv_vcpu_mmio_store", "kvm_riscv_vcpu_mmio_load", "tlb_flush", "lockdep_warnings",
    "kvm_map_page_fast", "kvm_emu_mmio_read", "kvm_emu_mmio_write",                  # loongarch/
    "pte_mkyoung", "pte_mkdirty", "kvm_mips_emulate_load", "kvm_mips_emulate_store",  # mips/
    # stage-2 blocks and MTE (arm64/, riscv/)
    "stage2_block_pmd", "stage2_block_pud", "thp_adjust", "gstage_block_pmd", "gstage_block_pud",
    "gstage_block_fault", "nx_huge_page_disallowed", "kvm_vm_ioctl_mte_copy_tags", "mte_clear_page_tags", "mte_copy_tags_to_user",
    "mte_copy_tags_from_user",
    "tlbwe", "guest_dsi", "kvmppc_e500_tlb1_pfnmap", "kvmppc_mmu_map_no_shadow", "kvmppc_mmu_map_ref_valid",  # ppc/
    # x86 shadow paging, write tracking, KVM_PRE_FAULT_MEMORY (x86/paging_tmpl.py, page_track.py, prefault.py)
    "mmu_try_to_unsync_pages", "mmu_unsync", "sync_spte", "mmu_sync_page", "mmu_shadow_pages", "inject_page_fault",
    "guest_page_fault", "make_spte:skip_unsync", "prefetch_present_spurious", "pre_fault_memory",
    "prefault_retry_livelock", "write_track_add",
    # generic KVM (kvm/)
    "hva_to_pfn", "kvm_vcpu_map", "host_map_access", "gpc_invalidate", "gpc_refresh", "gpc_refresh_kept",
    "gpc_refresh_error", "gpc_refresh_retry", "mark_page_dirty_in_slot", "get_dirty_log", "clear_dirty_log",
    "memslot_create", "memslot_delete", "memslot_move", "memslot_flags_only",
    # host mm (mm/)
    "host_mmap", "host_munmap", "host_fork", "host_page_fault", "host_huge_alloc", "host_cow_break",
    "mmu_notifier_invalidate", "gup_fast", "gup_slow", "follow_pfnmap", "page_free", "premature_free",
    "uaf", "refcount_underflow", "writeback_folio", "data_lost", "reclaimed", "migrate_busy", "migrated",
    "thp_split", "thp_collapse",
    "memory_failure", "async_pf",                                  # scenarios/ops_reach.py, kvm/async_pf.py
    # PowerPC Book3S (ppc/)
    "kvmppc_hv_emulate_mmio", "kvmppc_core_queue_data_storage", "kvmppc_emulate_mmio", "hpte_cache_alloc_failed",
    "kvmppc_mmu_pte_flush_all", "kvmppc_mmu_map_page_no_pfn", "uv_page_in", "uv_page_in_no_struct_page",
    "kvmppc_gfn_shared", "kvmppc_xive_native_set_queue_config_no_page",
    # x86 nested VMX/SVM and the VMX APIC-access page (x86/nested.py, x86/vmx.py)
    "nested_vmenter", "nested_vmexit", "nested_map_failed", "nested_posted_interrupt", "apic_access_faultin", "apic_page_reload_requested",
    # guest_memfd and memory attributes (kvm/gmem.py, kvm/memory_attributes.py, x86/private_mem.py)
    "kvm_gmem_get_pfn", "kvm_gmem_punch_hole", "memory_fault_exit", "private_shared_mismatch", "set_memory_attributes",
    "set_memory_attributes_noop", "kvm_arch_post_set_memory_attributes", "hugepage_mixed", "private_max_level",
    # the "current" (v6.18) differences: dirty-ring reset (kvm/dirty.py), arm64 PFNMAP memory type (arm64/pfnmap.py)
    "kvm_reset_dirty_gfn", "dirty_ring_reset_eintr", "s2_noncacheable", "s2_cacheable_pfnmap",
    "cacheable_pfnmap_refused",
}) | frozenset(DERIVED_COUNTERS)

#: Counter families ``<prefix>:<kernel function or reason>``.
COUNTER_FAMILIES = ("get_page:", "put_page:", "pin:", "unpin:", "set_dirty:", "mark_accessed:", "tlb_flush:",
                    "WARN_ON:", "kvm_err:")


def counter_problem(name: str) -> str | None:
    """Why ``name`` is not a counter the model keeps, or None."""
    if name in MODEL_COUNTERS:
        return None
    for fam in COUNTER_FAMILIES:
        if name.startswith(fam):
            return None if len(name) > len(fam) else f"counter {name!r} needs a function name after {fam!r}"
    near = difflib.get_close_matches(name, sorted(MODEL_COUNTERS) + [f + "<function>" for f in COUNTER_FAMILIES],
                                     n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(near)}?" if near else \
        f"; counters are {', '.join(sorted(DERIVED_COUNTERS))}, the model's own (kvmsim run --trace shows them) " \
        f"or a family {', '.join(f + '<function>' for f in COUNTER_FAMILIES)}"
    return f"unknown counter {name!r}{hint}"


# ---- expectations ------------------------------------------------------------------------------------

#: The exits the model's vCPU produces (the backend-only terminal exits of a whole run are not steps).
EXITS = tuple(e.value for e in (Exit.OK, Exit.MMIO, Exit.EFAULT, Exit.EINTR, Exit.HWPOISON, Exit.DIRTY_RING_FULL,
                                 Exit.LIVELOCK, Exit.MEMORY_FAULT,
                                 Exit.EXCEPTION))     # EXCEPTION: a guest #PF (paging = "indirect")
ERRNO_NAMES = frozenset(_errno.errorcode.values()) | {"EHWPOISON"}


def c_bounds(v: Any) -> Any:
    """A counter or violation-count expectation: an exact integer or ``{min = , max = }``."""
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 0:
            raise ValueError(f"a count cannot be negative, got {v}")
        return v
    if isinstance(v, dict) and v and set(v) <= {"min", "max"} and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v.values()):
        if any(x < 0 for x in v.values()):
            raise ValueError(f"a count cannot be negative, got {v!r}")
        if v.get("min", 0) > v.get("max", v.get("min", 0)):
            raise ValueError(f"min {v['min']} is greater than max {v['max']}: no count can match")
        return dict(v)
    raise ValueError(f"expected an integer or a table {{min = N, max = M}}, got {v!r}")


def c_violations(v: Any) -> dict[str, Any]:
    """``["INV-1", ...]`` (exactly these invariants, any count) or ``{"INV-1" = 2, ...}``."""
    if isinstance(v, list):
        out: dict[str, Any] = {}
        for x in v:
            if not isinstance(x, str) or not re.fullmatch(r"INV-(1[0-2]|[1-9])", x):
                raise ValueError(f"expected invariant ids INV-1 .. INV-12, got {x!r}")
            out[x] = {"min": 1}
        return out
    if isinstance(v, dict):
        for k, n in v.items():
            if not re.fullmatch(r"INV-(1[0-2]|[1-9])", k):
                raise ValueError(f"expected invariant ids INV-1 .. INV-12, got {k!r}")
            try:
                c_bounds(n)
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
        return dict(v)
    raise ValueError(f"expected a list of invariants or a table invariant = count, got {v!r}")


def c_counters(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ValueError(f"expected a table counter = N or counter = {{min, max}}, got {v!r}")  # noqa: TRY004
    for name, n in v.items():
        why = counter_problem(name)
        if why:
            raise ValueError(why)
        try:
            c_bounds(n)
        except ValueError as e:
            raise ValueError(f"counter {name!r}: {e}") from None
    return dict(v)


def c_exit(v: Any) -> Any:
    if isinstance(v, list):
        return [c_exit(x) for x in v]
    if not isinstance(v, str) or v.lower() not in EXITS:
        raise ValueError(f"expected a KVM_RUN exit ({', '.join(EXITS)}) or a list of them, got {v!r}")
    return v.lower()


def c_result(v: Any) -> Any:
    if isinstance(v, list):
        return [c_result(x) for x in v]
    if not isinstance(v, str):
        raise ValueError(f"expected a result string or a list of them, got {v!r}")  # noqa: TRY004
    return v.lower()


def c_errno(v: Any) -> str:
    """An errno name (``EFAULT``) or ``"0"`` for success."""
    if not isinstance(v, str) or (v.upper() not in ERRNO_NAMES and v != "0"):
        raise ValueError(f"expected an errno name such as EFAULT or EINVAL (or \"0\"), got {v!r}")
    return v.upper()


# ---- names a step refers to ----------------------------------------------------------------------------

#: Ops that need a VMA with a file mapping (page cache): ``address_space`` operations.
NEEDS_MAPPING = frozenset({"truncate", "punch_hole", "writeback"})
MAPPED_KINDS = frozenset({"anon_shared", "memfd", "file", "hugetlb"})

#: Integer step arguments that are unsigned in the kernel's ABI, with their width in bits
#: (``struct kvm_userspace_memory_region.slot``, ``struct kvm_clear_dirty_log.first_page/num_pages``, ...).
UNSIGNED_ARGS = {"id": 32, "slot": 32, "first": 64, "num": 32, "length": 64}

#: name-table → (op that creates a handle, ops that use it, ops that release it)
HANDLES = {
    "kvm_vcpu_map": ("vcpu_map", ("map_access",), ("vcpu_unmap",)),
    "gfn_to_page result": ("gfn_to_page", (), ("release_page",)),
    "pfncache": ("pfncache_activate", ("pfncache_refresh", "pfncache_write", "pfncache_check"), ()),
}


class _Names:
    """Handles alive at a point of the step list: table → {name: step number that made it}."""

    def __init__(self) -> None:
        self.live: dict[str, dict[str, int]] = {t: {} for t in HANDLES}
        self.gone: dict[str, dict[str, int]] = {t: {} for t in HANDLES}


def _check_refs(sc: Scenario, err, path: tuple, step: Step, names: _Names, extra: dict[str, set[str]],
                index: int) -> None:
    """Check one step's (or interleave thread's) references; ``extra``: handles a sibling thread makes."""
    a = step.args
    vmas = {v.name: v for v in sc.vmas}
    if a.get("vma") is not None and a["vma"] not in vmas:          # gmem_memslot_set: vma is optional
        raise err(path + ("vma",), f"no [[vma]] named {a['vma']!r} (have: {', '.join(vmas) or 'none'})")
    if a.get("to") is not None and a["to"] not in vmas:
        raise err(path + ("to",), f"no [[vma]] named {a['to']!r} (have: {', '.join(vmas) or 'none'})")
    if step.op in NEEDS_MAPPING and vmas[a["vma"]].kind not in MAPPED_KINDS:
        raise err(path + ("vma",), f"{step.op} needs a VMA with a file mapping (kind {', '.join(sorted(MAPPED_KINDS))}); "
                                   f"{a['vma']!r} is {vmas[a['vma']].kind}")
    if "driver" in a:
        drivers = [d.name for d in sc.drivers]
        if a["driver"] not in drivers:
            raise err(path + ("driver",), f"no [[driver]] named {a['driver']!r} (have: {', '.join(drivers) or 'none'})")
    for k, bits in UNSIGNED_ARGS.items():
        if a.get(k) is not None and not 0 <= a[k] < 1 << bits:
            raise err(path + (k,), f"expected 0 .. {(1 << bits) - 1:#x} ({k} is a u{bits} in the ioctl), got {a[k]}")
    if "vcpu" in a and not 0 <= a["vcpu"] < sc.vm.vcpus:
        raise err(path + ("vcpu",), f"no vCPU {a['vcpu']}: the VM has {sc.vm.vcpus} "
                                    f"(vcpu = 0 .. {sc.vm.vcpus - 1}; [vm] vcpus = N for more)")
    for table, (_, users, releasers) in HANDLES.items():
        if step.op in users or step.op in releasers:
            name = a["name"]
            if name in names.live[table] or name in extra.get(table, set()):
                continue
            if name in names.gone[table]:
                why = f"it was released at step {names.gone[table][name]}"
            else:
                have = sorted(names.live[table])
                why = f"no earlier {HANDLES[table][0]} step makes it (have: {', '.join(have) or 'none'})"
            raise err(path + ("name",), f"no {table} named {name!r}: {why}")


def _apply(step: Step, names: _Names, index: int) -> None:
    for table, (maker, _, releasers) in HANDLES.items():
        if step.op == maker:
            names.live[table][step.args["name"]] = index
            names.gone[table].pop(step.args["name"], None)
        elif step.op in releasers and step.args["name"] in names.live[table]:
            del names.live[table][step.args["name"]]
            names.gone[table][step.args["name"]] = index


def check_steps(sc: Scenario, err) -> None:
    """Every step's references resolve at the point it runs; ``err(path, message)`` builds the error."""
    names = _Names()
    for i, step in enumerate(sc.steps):
        path = ("step", i)
        if step.op == "interleave":
            threads = step.args["threads"]
            made: dict[str, set[str]] = {}
            for t in threads.values():
                for table, (maker, _, _) in HANDLES.items():
                    if t.op == maker:
                        made.setdefault(table, set()).add(t.args["name"])
            for tname, t in threads.items():
                _check_refs(sc, err, path + ("threads", tname), t, names, made, i + 1)
            for t in threads.values():
                _apply(t, names, i + 1)
        else:
            _check_refs(sc, err, path, step, names, {}, i + 1)
            _apply(step, names, i + 1)
        for who in step.expect:
            if who != "*" and who not in sc.policies:
                raise err(path + ("expect", who), f"an expectation for policy {who!r}, which this scenario "
                                                  f"never runs (it runs {', '.join(sc.policies)})")


def check_final(verdict: str | None, violations: dict[str, Any] | None) -> str | None:
    """Why ``verdict`` and ``violations`` of one ``[expect.<policy>]`` cannot both hold, or None."""
    if violations is None or verdict is None:
        return None
    least = sum(w if isinstance(w, int) else w.get("min", 0) for w in violations.values())
    if verdict == "clean" and least > 0:
        return (f"verdict = \"clean\" means no violation, but violations asks for at least {least} "
                f"({', '.join(violations)})")
    if verdict == "violations" and not violations:
        return "verdict = \"violations\" means at least one violation, but violations = [] allows none"
    if verdict == "violations" and all(isinstance(w, int) and w == 0 or isinstance(w, dict) and w.get("max") == 0
                                       for w in violations.values()):
        return "verdict = \"violations\" means at least one violation, but violations allows none"
    return None
