"""Shared Hypothesis strategies: well-formed kvmsim scenarios over every op, VMA kind, driver class,
arch (x86 TDP and shadow, arm64, RISC-V, PPC e500, generic) and policy, interleaves included.

:func:`scenario_docs` draws a scenario document (the dict a TOML file parses to) whose names all
refer to things the scenario defines: VMAs, drivers, memslots, vCPUs, and the ``map`` / ``page`` /
``gpc`` objects of earlier steps.  :func:`to_toml` renders it as scenario file text, so a test can
put it through the real loader (:func:`kvmsim.scenarios.loader.loads`).  What a step then does
(an errno, an exit, a violation) is up to the model; the document itself is always valid input.

The smaller strategies at the end (policies, values, page sets, x86 access sequences) serve the state
machines; sizes are parameters, not globals, so each machine draws over its own memslot.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

from kvmsim.backend.base import MappingKind
from kvmsim.mm.vma import VmaKind

PAGE = 4096
POLICIES = ("legacy", "series", "pre-5.13", "series-rc1", "series-only", "current")
ARCHES = (("x86", "tdp"), ("x86", "shadow"), ("arm64", "tdp"), ("riscv", "tdp"), ("generic", "tdp"), ("s390", "tdp"),
          ("loongarch", "tdp"), ("mips", "tdp"),
          ("ppc-book3s-hv", "tdp"), ("ppc-book3s-radix", "tdp"), ("ppc-book3s-pr", "tdp"), ("ppc-e500", "tdp"))
PFN_CLASSES = ("normal", "zero", "zone_device", "reserved", "nonrefcounted", "driver_refcounted", "no_page")
FILE_KINDS = ("anon_shared", "memfd", "file", "hugetlb")        # VMAs with a file mapping
SLOT_STRIDE = 1 << 30                                            # memslot i lives at i GiB


# ---- set-up ------------------------------------------------------------------------------------------

@st.composite
def drivers(draw) -> list[dict]:
    out = []
    for i in range(draw(st.integers(0, 2))):
        d = {"name": f"drv{i}", "pfn_class": draw(st.sampled_from(PFN_CLASSES))}
        if draw(st.booleans()):
            d["order"] = draw(st.integers(0, 2))
            d["compound"] = draw(st.booleans())
            d["prefault"] = draw(st.booleans())
            d["pte_write"] = draw(st.sampled_from(["always", "on_write_fault", "never"]))
            d["mixed"] = draw(st.booleans())
            d["free_rule"] = draw(st.sampled_from(["free", "put"]))
            d["cacheable"] = draw(st.booleans())
        out.append(d)
    return out


@st.composite
def vmas(draw, driver_names: list[str]) -> list[dict]:
    kinds = ["anon", "anon_shared", "memfd", "file", "hugetlb"] + (["pfnmap", "mixedmap"] if driver_names else [])
    out = []
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        v: dict = {"name": f"v{i}", "kind": kind}
        if kind == "hugetlb":
            v["page_size"] = "2M"
            v["size"] = draw(st.sampled_from([2 << 20, 4 << 20]))
        elif kind in ("anon", "anon_shared", "memfd") and draw(st.integers(0, 4)) == 0:
            v["thp"] = True
            v["size"] = 2 << 20
        else:
            npages = draw(st.one_of(st.integers(1, 16), st.integers(65, 160)))
            v["size"] = npages * PAGE
        if kind in ("pfnmap", "mixedmap"):
            v["driver"] = draw(st.sampled_from(driver_names))
            if kind == "mixedmap" and draw(st.booleans()):
                v["io"] = True                          # VM_MIXEDMAP|VM_IO
        if draw(st.integers(0, 6)) == 0:
            v["prot"] = draw(st.sampled_from(["r", "w", "none"]))
        if kind == "file" and draw(st.integers(0, 3)) == 0:
            v["writenotify"] = draw(st.booleans())
        out.append(v)
    return out


def _flags(draw) -> list[str]:
    return draw(st.lists(st.sampled_from(["log_dirty_pages", "readonly"]), unique=True, max_size=2))


@st.composite
def vm_section(draw) -> dict:
    arch, mmu = draw(st.sampled_from(ARCHES))
    vm: dict = {"policy": draw(st.sampled_from(POLICIES)), "arch": arch}
    if mmu != "tdp":
        vm["mmu"] = mmu
    if mmu == "shadow" and draw(st.booleans()):
        vm["paging"] = "indirect"                   # shadow paging, TDP off (kvmsim.x86.paging_tmpl)
    vm["vcpus"] = draw(st.integers(1, 2))
    if arch == "ppc-book3s-pr" and draw(st.booleans()):
        vm["ppc_pr_host"] = "32-bit"
    if draw(st.booleans()):
        vm["pml"] = draw(st.booleans())
        vm["v613_other"] = draw(st.booleans())
        vm["allow_unsafe_mappings"] = draw(st.booleans())
    if draw(st.integers(0, 5)) == 0:
        vm["execution"] = "emulated"
    if arch == "arm64" and draw(st.integers(0, 3)) == 0:
        vm["mte"] = True
    if arch == "arm64" and draw(st.integers(0, 3)) == 0:
        vm["cacheable_pfnmap_supported"] = False     # no FWB / DIC: v6.17 refuses cacheable PFNMAP
    if arch == "x86" and draw(st.booleans()):       # the x86 MMU knobs (scenarios/ops_reach.py's keys)
        for k in ("ad_enabled", "eager_split", "slot_zap_all", "nx_huge_pages", "async_pf"):
            if draw(st.booleans()):
                vm[k] = draw(st.booleans())
        if draw(st.integers(0, 3)) == 0:
            vm["maxphyaddr"] = draw(st.sampled_from([36, 39, 46, 52]))
    if draw(st.integers(0, 3)) == 0:                 # the other arches' address widths
        key, values = {"arm64": ("ipa_bits", [32, 40, 48]), "loongarch": ("cpu_vabits", [40, 48]),
                       "riscv": ("gstage_pgd_levels", [3, 4, 5])}.get(arch, (None, None))
        if key:
            vm[key] = draw(st.sampled_from(values))
    dirty = draw(st.sampled_from(["bitmap", "bitmap", "manual", "manual_set", "ring"]))
    if dirty in ("manual", "manual_set"):
        vm["manual_protect"] = True
        vm["initially_set"] = dirty == "manual_set"
    elif dirty == "ring":
        vm["dirty_ring"] = draw(st.sampled_from([4096, 1 << 16]))
        if draw(st.booleans()):
            vm["dirty_ring_with_bitmap"] = True         # set-up fails (EINVAL) except on arm64
    if draw(st.integers(0, 9)) == 0:
        vm["mutations"] = draw(st.lists(st.sampled_from(["skip-retry", "nonatomic-spte", "mark-dirty-after-unlock"]),
                                        unique=True, min_size=1, max_size=2))
    return vm


# ---- steps -------------------------------------------------------------------------------------------

class _World:
    """What the scenario defines so far: what a step may name."""

    def __init__(self, drivers: list[dict], vmas: list[dict], slots: list[dict], vcpus: int):
        self.drivers = [d["name"] for d in drivers]
        self.vmas = {v["name"]: v for v in vmas}
        self.slots = {s["id"]: s for s in slots}
        self.vcpus = vcpus
        self.maps: set[str] = set()
        self.pages: set[str] = set()
        self.gpcs: set[str] = set()


def _gpa(draw, w: _World) -> int:
    if w.slots and draw(st.integers(0, 7)):
        s = w.slots[draw(st.sampled_from(sorted(w.slots)))]
        npages = s["size"] // PAGE
        return s["gpa"] + draw(st.integers(0, max(0, npages + 1))) * PAGE + _odd(draw)
    return draw(st.sampled_from([0, 7 * SLOT_STRIDE, 0x1000]))


def _odd(draw) -> int:
    """Mostly 0; sometimes a sub-page amount, which a system call may refuse (EINVAL) but is valid input."""
    return draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 1, 0x800]))


def _vma_range(draw, w: _World, name: str) -> dict:
    npages = w.vmas[name]["size"] // PAGE
    a = {"vma": name}
    if draw(st.booleans()):
        off = draw(st.integers(0, npages - 1))
        a["offset"] = off * PAGE + _odd(draw)
        if draw(st.booleans()):
            a["size"] = draw(st.integers(0 if _odd(draw) else 1, npages - off)) * PAGE + _odd(draw)
    return a


def _vma_at(draw, w: _World, name: str) -> dict:
    npages = w.vmas[name]["size"] // PAGE
    return {"vma": name, "offset": draw(st.integers(0, npages - 1)) * PAGE + _odd(draw)}


def _vcpu(draw, w: _World) -> dict:
    return {"vcpu": draw(st.integers(0, w.vcpus - 1))} if w.vcpus > 1 and draw(st.booleans()) else {}


GUEST_OPS = ("read", "write", "fault", "store", "zap", "tlbwe")
HOST_OPS = ("munmap", "mprotect", "madvise", "mremap", "fork", "writeback", "reclaim", "migrate", "thp_split",
            "thp_collapse", "truncate", "punch_hole", "driver_teardown", "host_write", "host_read", "folio_referenced",
            "age")
KVM_OPS = ("memslot_set", "memslot_delete", "memslot_move", "memslot_flags", "get_dirty_log", "clear_dirty_log",
           "ring_harvest", "ring_reset", "vcpu_map", "vcpu_unmap", "map_access", "gfn_to_page", "release_page",
           "pfncache_activate", "pfncache_refresh", "pfncache_write", "pfncache_check", "vm_destroy", "mte_copy_tags")
S390_OPS = ("vsie_run", "vsie_enter", "vsie_exit")
REACH_OPS = ("memory_failure", "enable_dirty_ring", "enable_dirty_ring_with_bitmap", "gstage_set_pte_error")
PPC_BOOK3S_OPS = ("dcbz_patch", "uv_share", "uv_page_in", "ppc_magic_page", "ppc_guest_pte", "hpte_cache_fail",
                  "xive_queue_config", "xive_queue_reset")
X86_NESTED_OPS = ("nested_vmenter", "nested_vmexit", "nested_posted_interrupt", "apic_access_alloc", "apic_access_reload", "apic_access_migrate")
GMEM_OPS = ("gmem_create", "gmem_memslot_set", "set_memory_attributes", "gmem_punch_hole", "gmem_fallocate")
X86_SHADOW_OPS = ("guest_pte_write", "invlpg", "cr3_load", "pre_fault_memory")
ALL_OPS = GUEST_OPS + HOST_OPS + KVM_OPS + S390_OPS + PPC_BOOK3S_OPS + X86_NESTED_OPS + GMEM_OPS + X86_SHADOW_OPS + \
    REACH_OPS


def _op_args(draw, w: _World, op: str) -> dict | None:
    """Arguments for ``op`` that name only what ``w`` defines; None if nothing fits."""
    vma_names = sorted(w.vmas)
    file_vmas = [n for n in vma_names if w.vmas[n]["kind"] in FILE_KINDS]
    if op in ("read", "write"):
        a = {"gpa": _gpa(draw, w), **_vcpu(draw, w)}
        big = [s for s in w.slots.values() if s["size"] > 64 * PAGE]
        if big and draw(st.integers(0, 2)) == 0:
            s = draw(st.sampled_from(big))
            a["gpa"] = s["gpa"]
            a["count"] = draw(st.integers(65, s["size"] // PAGE))
        elif draw(st.booleans()):
            a["count"] = draw(st.integers(1, 4))
            if draw(st.integers(0, 4)) == 0:
                a["stride"] = 2 * PAGE
        if op == "write" and draw(st.booleans()):
            a["value"] = draw(st.integers(0, 255))
        if draw(st.integers(0, 3)) == 0:
            a["private"] = draw(st.booleans())      # the guest's C-bit / shared bit
        return a
    if op == "fault":
        a = {"gpa": _gpa(draw, w), "write": draw(st.booleans()), **_vcpu(draw, w)}
        if draw(st.integers(0, 3)) == 0:
            a["private"] = draw(st.booleans())
        if draw(st.integers(0, 3)) == 0:
            a["exec"] = True
        if draw(st.integers(0, 3)) == 0:
            a["signal_pending"] = True
        return a
    if op in GMEM_OPS:
        return _gmem_args(draw, w, op)
    if op == "memory_failure":
        return _vma_at(draw, w, draw(st.sampled_from(vma_names)))
    if op == "enable_dirty_ring":
        return {"size": draw(st.sampled_from([0, 1000, 4096, 1 << 16, 1 << 20, 1 << 21]))}
    if op == "enable_dirty_ring_with_bitmap":
        return {}
    if op == "gstage_set_pte_error":                    # RISC-V only (EINVAL elsewhere)
        return {"errno": draw(st.sampled_from(["enomem", "eexist"]))}
    if op == "store":
        return {"gpa": _gpa(draw, w), "value": draw(st.integers(0, 255)), **_vcpu(draw, w)}
    if op == "zap":
        return {"gpa": _gpa(draw, w)}
    if op == "tlbwe":                                   # an e500 guest TLB write (an error on other arches)
        a = {"tlb": draw(st.integers(0, 1)), "esel": draw(st.integers(0, 3)), "gpa": _gpa(draw, w), **_vcpu(draw, w)}
        if draw(st.booleans()):
            a["size"] = draw(st.sampled_from([PAGE, 4 * PAGE, 16 * PAGE, 1 << 20, 3 * PAGE]))
        if draw(st.booleans()):
            a["mas3"] = draw(st.lists(st.sampled_from(["SR", "SW", "SX", "UR", "UW", "UX"]), unique=True, max_size=6))
        return a
    if op in ("munmap", "reclaim"):
        return _vma_range(draw, w, draw(st.sampled_from(vma_names)))
    if op == "mprotect":
        return {**_vma_range(draw, w, draw(st.sampled_from(vma_names))),
                "prot": draw(st.sampled_from(["rw", "r", "w", "none"]))}
    if op == "madvise":
        return {**_vma_range(draw, w, draw(st.sampled_from(vma_names))),
                "advice": draw(st.sampled_from(["dontneed", "remove"]))}
    if op == "age":
        return {**_vma_range(draw, w, draw(st.sampled_from(vma_names))),
                "how": draw(st.sampled_from(["clear_young", "clear_flush_young", "test_young"]))}
    if op == "mremap":
        a = {"vma": draw(st.sampled_from(vma_names))}
        if draw(st.integers(0, 3)) == 0:
            a["to"] = draw(st.sampled_from(vma_names))
        return a
    if op == "mte_copy_tags":
        return {"gpa": _gpa(draw, w), "size": draw(st.integers(1, 3)) * PAGE,
                "direction": draw(st.sampled_from(["to_guest", "from_guest"])), "tag": draw(st.integers(0, 15))}
    if op == "ring_reset":
        return {"signal_after": draw(st.integers(0, 3))} if draw(st.integers(0, 2)) == 0 else {}
    if op in ("fork", "vm_destroy"):
        return {}
    if op in ("migrate", "thp_split", "thp_collapse", "host_read"):
        return _vma_at(draw, w, draw(st.sampled_from(vma_names)))
    if op == "host_write":
        return {**_vma_at(draw, w, draw(st.sampled_from(vma_names))), "value": draw(st.integers(0, 255))}
    if op == "folio_referenced":
        a = _vma_at(draw, w, draw(st.sampled_from(vma_names)))
        left = max(1, (w.vmas[a["vma"]]["size"] - a["offset"]) // PAGE)
        return {**a, "count": draw(st.integers(1, min(4, left)))}
    if op == "writeback":
        if not file_vmas:
            return None
        name = draw(st.sampled_from(file_vmas))
        return {"vma": name} if draw(st.booleans()) else _vma_at(draw, w, name)
    if op == "truncate":
        if not file_vmas:
            return None
        name = draw(st.sampled_from(file_vmas))
        return {"vma": name, "size": draw(st.integers(0, w.vmas[name]["size"] // PAGE)) * PAGE}
    if op == "punch_hole":
        if not file_vmas:
            return None
        a = _vma_at(draw, w, draw(st.sampled_from(file_vmas)))
        left = max(1, (w.vmas[a["vma"]]["size"] - a["offset"]) // PAGE)
        return {**a, "size": draw(st.integers(1, left)) * PAGE}
    if op == "driver_teardown":
        return {"driver": draw(st.sampled_from(w.drivers))} if w.drivers else None
    if op == "memslot_set":
        sid = draw(st.integers(0, 4))
        name = draw(st.sampled_from(vma_names))
        npages = w.vmas[name]["size"] // PAGE
        off = draw(st.integers(0, npages - 1))
        a = {"id": sid, "gpa": draw(st.integers(0, 5)) * SLOT_STRIDE, "size": draw(st.integers(0, npages - off)) * PAGE,
             "vma": name, "offset": off * PAGE, "flags": _flags(draw)}
        return a
    if op in ("memslot_delete", "memslot_move", "memslot_flags", "get_dirty_log", "clear_dirty_log"):
        if not w.slots:
            return None
        sid = draw(st.sampled_from(sorted(w.slots)))
        if op == "memslot_delete":
            return {"id": sid}
        if op == "memslot_move":
            return {"id": sid, "gpa": draw(st.integers(0, 5)) * SLOT_STRIDE}
        if op == "memslot_flags":
            return {"id": sid, "flags": _flags(draw)}
        if op == "get_dirty_log":
            return {"slot": sid}
        npages = w.slots[sid]["size"] // PAGE
        first = draw(st.sampled_from([0, 0, 64])) if npages > 64 else 0
        a = {"slot": sid, "first": first}
        if draw(st.booleans()):
            a["num"] = draw(st.sampled_from([64, max(0, npages - first)]))
        return a
    if op == "ring_harvest":
        return _vcpu(draw, w)
    if op == "vcpu_map":
        w.maps.add("map")
        return {"gpa": _gpa(draw, w), "writable": draw(st.booleans()), **_vcpu(draw, w)}
    if op in ("vcpu_unmap", "map_access"):
        if "map" not in w.maps:
            return None
        if op == "vcpu_unmap":
            w.maps.discard("map")                   # released: later steps may not name it (the loader refuses)
            return {"dirty": draw(st.booleans())}
        return {"write": draw(st.booleans()), "value": draw(st.integers(0, 255))}
    if op == "gfn_to_page":
        w.pages.add("page")
        return {"gpa": _gpa(draw, w), "write": draw(st.booleans())}
    if op == "release_page":
        if "page" not in w.pages:
            return None
        w.pages.discard("page")
        return {"dirty": draw(st.booleans())}
    if op == "pfncache_activate":
        w.gpcs.add("gpc")
        return {"gpa": _gpa(draw, w) + draw(st.sampled_from([0, 8, 4088])),
                "length": draw(st.sampled_from([8, 32]))}
    if op in ("pfncache_refresh", "pfncache_check"):
        return {} if "gpc" in w.gpcs else None
    if op == "pfncache_write":
        return {"value": draw(st.integers(0, 255))} if "gpc" in w.gpcs else None
    if op in S390_OPS:
        return _vsie_args(draw, w, op)
    if op in ("dcbz_patch", "ppc_magic_page"):
        return {"gpa": _gpa(draw, w), **_vcpu(draw, w)}
    if op in ("uv_share", "uv_page_in"):
        return {"gpa": _gpa(draw, w)}
    if op == "ppc_guest_pte":
        return {"gpa": _gpa(draw, w), "may_write": draw(st.booleans())}
    if op == "hpte_cache_fail":
        return {"count": draw(st.integers(1, 3))}
    if op == "xive_queue_config":
        return {"gpa": _gpa(draw, w), "server": draw(st.integers(0, 1))}
    if op == "xive_queue_reset":
        return {"server": draw(st.integers(0, 1))}
    if op in X86_NESTED_OPS:
        return _x86_nested_args(draw, w, op)
    if op == "guest_pte_write":                     # an error unless paging = "indirect"
        a = {"gva": _gpa(draw, w) & ~0xFFF, "gpa": _gpa(draw, w) & ~0xFFF,
             "flags": draw(st.lists(st.sampled_from(["present", "writable", "user", "accessed", "dirty", "nx"]),
                                    unique=True, max_size=6))}
        if draw(st.integers(0, 3)):
            a["pt"] = _gpa(draw, w) & ~0xFFF
        return {**a, **_vcpu(draw, w)}
    if op == "invlpg":
        return {"gva": _gpa(draw, w), **_vcpu(draw, w)}
    if op == "cr3_load":
        return _vcpu(draw, w)
    if op == "pre_fault_memory":
        a = {"gpa": _gpa(draw, w) & (~0xFFF if draw(st.integers(0, 5)) else ~0)}
        if draw(st.booleans()):
            a["size"] = draw(st.sampled_from([PAGE, 4 * PAGE, 512 * PAGE, 3 * PAGE + 1, 0]))
        if draw(st.integers(0, 7)) == 0:
            a["flags"] = 1
        return {**a, **_vcpu(draw, w)}
    raise AssertionError(f"no argument strategy for op {op!r}")


def _x86_nested_args(draw, w: _World, op: str) -> dict:
    """vmcs12 / vmcb12 addresses in (or outside) the memslots; the APIC-access page ops take nothing."""
    mode = draw(st.sampled_from(["vmx", "svm"]))
    if op == "nested_vmenter":
        if mode == "svm":
            return {"mode": mode, "vmcb12": _gpa(draw, w), **_vcpu(draw, w)}
        return {"mode": mode, **{k: _gpa(draw, w) for k in ("apic_access", "virtual_apic", "pi_desc", "msr_bitmap",
                                                             "evmcs") if draw(st.booleans())}, **_vcpu(draw, w)}
    if op == "nested_vmexit":
        return {"mode": mode, "free": draw(st.booleans()), **_vcpu(draw, w)}
    if op == "apic_access_reload":
        return {"force": draw(st.booleans()), **_vcpu(draw, w)}
    if op == "nested_posted_interrupt":
        return {"vector": draw(st.integers(0, 255)), **_vcpu(draw, w)}
    return {}


def _gmem_args(draw, w: _World, op: str) -> dict:
    """guest_memfd files (always named ``gmem``; a second create is EINVAL, a use before one EBADF: both
    are results), their memslots at a fresh GiB, conversions over some pages, punch-holes."""
    size = draw(st.sampled_from([1, 2, 4, 512])) * PAGE
    if op == "gmem_create":
        return {"size": size, **({"flags": draw(st.sampled_from([0, 1, 2, 3, 4]))} if draw(st.integers(0, 4)) == 0 else {})}
    if op == "gmem_memslot_set":
        a = {"id": draw(st.integers(0, 5)), "gpa": draw(st.integers(0, 6)) * SLOT_STRIDE, "size": size,
             "gmem_offset": draw(st.sampled_from([0, 0, PAGE, 3]))}
        if w.vmas and draw(st.booleans()):
            a["vma"] = draw(st.sampled_from(sorted(w.vmas)))
        return a
    if op == "set_memory_attributes":
        a = {"gpa": _gpa(draw, w) & ~(PAGE - 1) if draw(st.integers(0, 5)) else _gpa(draw, w) | 1,
             "size": draw(st.sampled_from([0, PAGE, 2 * PAGE, 512 * PAGE])), "private": draw(st.booleans())}
        if draw(st.integers(0, 6)) == 0:
            a["flags" if draw(st.booleans()) else "attributes"] = draw(st.sampled_from([1, 8, 9]))
        return a
    off = draw(st.integers(0, 3)) * PAGE + (1 if draw(st.integers(0, 6)) == 0 else 0)
    if op == "gmem_punch_hole":
        return {"offset": off, "size": draw(st.integers(0, 3)) * PAGE}
    return {"mode": draw(st.sampled_from([0, 1, 2, 3, 8])), "offset": off, "size": draw(st.integers(0, 3)) * PAGE}


def _vsie_args(draw, w: _World, op: str) -> dict:
    """An SCB address (mostly 512-byte aligned) and, for an entry, some satellite blocks."""
    a = {"scb": _gpa(draw, w) & (~0x1FF if draw(st.integers(0, 5)) else ~0)}
    if op == "vsie_exit":
        return a
    for block in ("sca", "itdba", "gvrd", "riccbd", "sdnxo"):
        if draw(st.integers(0, 3)) == 0:
            a[block] = _gpa(draw, w) | (draw(st.integers(0, 15)) if block == "sdnxo" else 0)
    return a


def _one_step(draw, w: _World, ops=ALL_OPS) -> dict:
    for _ in range(20):
        op = draw(st.sampled_from(GUEST_OPS if draw(st.integers(0, 2)) == 0 else ops))
        a = _op_args(draw, w, op)
        if a is not None:
            return {"op": op, **a}
    return {"op": "fork"}


@st.composite
def steps(draw, w: _World) -> list[dict]:
    out = []
    for _ in range(draw(st.integers(1, 10))):
        if draw(st.integers(0, 3)) == 0:
            n = draw(st.integers(2, 3))
            names = ["t0", "t1", "t2"][:n]
            # the threads see what earlier steps defined, not what a sibling thread defines
            snapshot = (set(w.maps), set(w.pages), set(w.gpcs))
            threads = {}
            for t in names:
                threads[t] = _one_step(draw, w)
                w.maps, w.pages, w.gpcs = (set(x) for x in snapshot)
            for th in threads.values():
                {"vcpu_map": w.maps, "gfn_to_page": w.pages, "pfncache_activate": w.gpcs}.get(th["op"], set()).add(
                    {"vcpu_map": "map", "gfn_to_page": "page", "pfncache_activate": "gpc"}.get(th["op"], ""))
            for th in threads.values():           # a handle a thread releases is gone for the later steps
                {"vcpu_unmap": w.maps, "release_page": w.pages}.get(th["op"], set()).discard(
                    {"vcpu_unmap": "map", "release_page": "page"}.get(th["op"], ""))
            # mostly a schedule the threads can follow (a one-step op takes two turns: to its yield,
            # then to its end); sometimes any sequence, which may name a finished or blocked thread
            if draw(st.integers(0, 4)):
                turns = [t for t in names for _ in range(draw(st.integers(1, 3)))]
                order = draw(st.permutations(turns))
            else:
                order = draw(st.lists(st.sampled_from(names), min_size=1, max_size=12))
            out.append({"op": "interleave", "threads": threads, "order": order})
        else:
            out.append(_one_step(draw, w))
    return out


@st.composite
def scenario_docs(draw) -> dict:
    """A well-formed scenario document (see the module docstring)."""
    drv = draw(drivers())
    vm_list = draw(vmas([d["name"] for d in drv]))
    vm = draw(vm_section())
    slots = []
    for i, v in enumerate(vm_list):
        if draw(st.integers(0, 4)) == 0:
            continue
        npages = v["size"] // PAGE
        off = draw(st.integers(0, npages - 1)) if draw(st.integers(0, 3)) == 0 else 0
        size = (npages - off) if draw(st.integers(0, 3)) else draw(st.integers(1, npages - off))
        flags = _flags(draw)
        # set-up memslots the arch accepts, so the steps run (a step's memslot_set may still be refused):
        # arm64/RISC-V refuse dirty logging over VM_PFNMAP, RISC-V a writable slot over a VMA without VM_WRITE
        if vm["arch"] in ("arm64", "riscv") and v["kind"] == "pfnmap" and "log_dirty_pages" in flags:
            flags.remove("log_dirty_pages")
        if vm["arch"] == "riscv" and "w" not in v.get("prot", "rw") and "readonly" not in flags:
            flags.append("readonly")
        if vm.get("mte") and v["kind"] not in ("anon", "anon_shared", "memfd"):
            continue                        # an MTE VM refuses a memslot over a VMA without VM_MTE_ALLOWED
        slots.append({"id": i, "gpa": i * SLOT_STRIDE, "size": size * PAGE, "vma": v["name"], "offset": off * PAGE,
                      "flags": flags})
    for d in drv:                           # a driver owns enough memory for every VMA that maps it
        sizes = [v["size"] for v in vm_list if v.get("driver") == d["name"]]
        if sizes:
            d["size"] = max(sizes)
    w = _World(drv, vm_list, slots, vm["vcpus"])
    doc = {"name": "fuzz", "description": "a random well-formed scenario", "driver": drv, "vma": vm_list,
           "vm": vm, "memslot": slots, "step": draw(steps(w))}
    if draw(st.integers(0, 3)) == 0:                 # the host kernel's mm settings
        doc["host"] = {"thp_zero_page": draw(st.booleans()), "swap": draw(st.booleans()),
                       "kernel": draw(st.sampled_from(["6.12", "6.13"]))}
    return doc


# ---- TOML --------------------------------------------------------------------------------------------

def _val(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return hex(v) if v > 4096 else str(v)
    if isinstance(v, str):
        return json.dumps(v)                      # ASCII JSON strings are TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_val(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(doc: dict) -> str:
    """Scenario file text for ``doc`` (the subset of TOML :func:`scenario_docs` needs)."""
    lines = []
    for k in ("name", "description", "source"):
        if k in doc:
            lines.append(f"{k} = {_val(doc[k])}")
    for key in ("driver", "vma"):
        for item in doc.get(key, []):
            lines += ["", f"[[{key}]]"] + [f"{k} = {_val(v)}" for k, v in item.items()]
    if "host" in doc:
        lines += ["", "[host]"] + [f"{k} = {_val(v)}" for k, v in doc["host"].items()]
    if "vm" in doc:
        lines += ["", "[vm]"] + [f"{k} = {_val(v)}" for k, v in doc["vm"].items()]
    for item in doc.get("memslot", []):
        lines += ["", "[[memslot]]"] + [f"{k} = {_val(v)}" for k, v in item.items()]
    for item in doc.get("step", []):
        lines += ["", "[[step]]"]
        for k, v in item.items():
            if k == "threads":
                lines += [f"threads.{t} = {_val(th)}" for t, th in v.items()]
            else:
                lines.append(f"{k} = {_val(v)}")
    return "\n".join(lines) + "\n"


# ---- state-machine strategies ----------------------------------------------------------------------------
#: The two kernels the model runs.
policies = st.sampled_from(["legacy", "series"])

#: A 64-bit guest/host store value that is never 0 (0 reads back like an untouched page).
values = st.integers(1, 2**40)

#: Host backings both the model and the real backend can give a memslot.
backend_mapping_kinds = st.sampled_from([MappingKind.ANON_SHARED, MappingKind.ANON_PRIVATE, MappingKind.MEMFD])

#: Model VMA kinds a plain 4 KiB memslot can sit on.
vma_kinds = st.sampled_from([VmaKind.ANON, VmaKind.ANON_SHARED, VmaKind.FILE])


def page_index(npages: int) -> st.SearchStrategy[int]:
    """One page of an ``npages`` memslot."""
    return st.integers(0, npages - 1)


def page_sets(npages: int, max_size: int = 8) -> st.SearchStrategy[list[int]]:
    """A few distinct pages of an ``npages`` memslot (one vCPU run touching each)."""
    return st.lists(page_index(npages), min_size=1, max_size=max_size, unique=True)


def page_ranges(npages: int, max_len: int = 8) -> st.SearchStrategy[tuple[int, int]]:
    """``(first, n)`` with ``first + n <= npages``: a host range (madvise, munmap) inside the slot."""
    return page_index(npages).flatmap(lambda first: st.tuples(st.just(first),
                                                              st.integers(1, min(max_len, npages - first))))


def x86_access_ops(npages: int = 1024, max_run: int = 600) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """Sequences of x86 guest accesses over page runs, dirty-log toggles and harvests, and aging."""
    return st.lists(st.tuples(st.sampled_from(["read", "write", "log_on", "log_off", "getlog", "age"]),
                              st.integers(0, npages - 1), st.integers(1, max_run)), min_size=1, max_size=8)
