"""What the in-guest agent observes in a real kernel: kprobe hit counts (kernel/trace/trace_kprobe.c:
``kprobe_events`` and ``kprobe_profile``), KVM binary stats (virt/kvm/binary_stats.c, read through
``kvmsim.backend.kvm.stats``), page flags (fs/proc/page.c ``/proc/kpageflags``; mm/page_idle.c
``/sys/kernel/mm/page_idle/bitmap``) and new kernel WARN/BUG records (``/dev/kmsg``).

A function the kernel does not have (inlined everywhere, renamed, or removed, e.g. ``kvm_set_pfn_dirty``
in v6.13) cannot be probed: it is reported as absent (``None``), never as 0 calls.
"""

from __future__ import annotations

import os
import re
import struct

TRACING = "/sys/kernel/tracing"
GROUP = "kvmsim"

# The kernel functions that carry the protocol (struct-page operations, releases, GUP, pfnmap).
PROBED_FUNCTIONS = (
    # legacy (v6.12) virt/kvm/kvm_main.c
    "kvm_set_pfn_dirty", "kvm_set_pfn_accessed", "kvm_release_pfn_clean", "kvm_release_pfn_dirty",
    # both
    "kvm_release_page_clean", "kvm_release_page_dirty",
    # series (v6.13)
    "kvm_release_page_unused", "kvm_release_faultin_page", "kvm_set_page_dirty", "kvm_set_page_accessed",
    # mm
    "mark_page_accessed", "folio_mark_accessed", "folio_mark_dirty", "set_page_dirty",
    # GUP and pfnmap entry points KVM uses (mm/gup.c, mm/memory.c)
    "get_user_pages_fast_only", "get_user_pages_unlocked", "pin_user_pages_unlocked", "follow_pfnmap_start",
    "hva_to_pfn_remapped",
    # KVM x86 MMU paths (arch/x86/kvm/mmu/)
    "kvm_tdp_mmu_map", "fast_page_fault", "kvm_unmap_gfn_range", "kvm_mmu_zap_all_fast",
    "kvm_tdp_mmu_clear_dirty_slot", "kvm_mmu_slot_apply_flags", "kvm_mmu_recover_huge_pages",
    "kvm_mmu_zap_collapsible_sptes", "kvm_gmem_get_pfn",
)

# KVM binary stats the agent records (VM stats, then vCPU stats as ``vcpu.<name>``).
VM_STATS = ("pages_4k", "pages_2m", "pages_1g", "remote_tlb_flush", "remote_tlb_flush_requests",
            "mmu_shadow_zapped", "mmu_pte_write", "mmu_flooded", "mmu_recycled", "mmu_cache_miss",
            "nx_lpage_splits", "max_mmu_page_hash_collisions")
VCPU_STATS = ("pf_taken", "pf_fixed", "pf_fast", "pf_spurious", "pf_emulate", "pf_mmio_spte_created",
              "pf_guest", "tlb_flush", "invlpg", "exits", "mmio_exits", "io_exits", "halt_exits")

KPF = {"locked": 0, "referenced": 2, "uptodate": 3, "dirty": 4, "lru": 5, "active": 6, "anon": 12,
       "swapcache": 13, "swapbacked": 14, "compound_head": 15, "compound_tail": 16, "huge": 17,
       "thp": 22, "zero_page": 24, "idle": 25}


def _safe_event(fn: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", fn)


class Kprobes:
    """One kprobe event per function (``p:kvmsim/<fn> <fn>``), enabled; ``hits()`` reads kprobe_profile."""

    def __init__(self, functions=PROBED_FUNCTIONS, tracing: str = TRACING):
        self.tracing = tracing
        self.present: dict[str, str] = {}
        self.absent: dict[str, str] = {}
        self.clear()
        for fn in functions:
            ev = _safe_event(fn)
            try:
                self._write("kprobe_events", f"p:{GROUP}/{ev} {fn}\n", append=True)
                self._write(f"events/{GROUP}/{ev}/enable", "1\n")
            except OSError as e:
                self.absent[fn] = os.strerror(e.errno or 0)
                continue
            self.present[fn] = ev

    def _write(self, rel: str, text: str, append: bool = False) -> None:
        # os-level: Python's buffered "a" mode seeks to the end, which tracefs files refuse (EINVAL)
        fd = os.open(os.path.join(self.tracing, rel), os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def clear(self) -> None:
        try:
            self._write(f"events/{GROUP}/enable", "0\n")
        except OSError:
            pass
        for line in open(os.path.join(self.tracing, "kprobe_events")).read().splitlines():
            if line.startswith(f"p:{GROUP}/"):
                self._write("kprobe_events", f"-:{line.split()[0][2:]}\n", append=True)

    def hits(self) -> dict[str, int | None]:
        """Hits so far per function; ``None`` for an absent function."""
        by_event = {}
        for line in open(os.path.join(self.tracing, "kprobe_profile")).read().splitlines():
            parts = line.split()
            if len(parts) >= 2:                 # "<event> <hits> <misses>" (no group prefix)
                by_event[parts[0].split("/", 1)[-1]] = int(parts[1])
        out: dict[str, int | None] = {fn: None for fn in self.absent}
        for fn, ev in self.present.items():
            out[fn] = by_event.get(ev, 0)
        return out


def delta(after: dict, before: dict) -> dict:
    """Per-key difference; ``None`` (absent) stays ``None``."""
    out = {}
    for k, v in after.items():
        if v is None or before.get(k) is None:
            out[k] = None
        elif isinstance(v, int):
            out[k] = v - before[k]
    return out


def pick_stats(all_stats: dict) -> dict[str, int]:
    out = {k: all_stats[k] for k in VM_STATS if isinstance(all_stats.get(k), int)}
    out.update({k: all_stats[f"vcpu.{k}"] for k in VCPU_STATS if isinstance(all_stats.get(f"vcpu.{k}"), int)})
    return out


def pagemap_pfns(hva: int, npages: int) -> list[int | None]:
    """The pfn of each page of ``[hva, hva + npages pages)`` from /proc/self/pagemap (None: not present)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek((hva >> 12) * 8)
        raw = f.read(8 * npages)
    out = []
    for (e,) in struct.iter_unpack("<Q", raw):
        out.append(e & ((1 << 55) - 1) if e >> 63 & 1 else None)
    return out


def kpageflags(pfns) -> list[int]:
    out = []
    with open("/proc/kpageflags", "rb") as f:
        for pfn in pfns:
            f.seek(pfn * 8)
            out.append(struct.unpack("<Q", f.read(8))[0])
    return out


def page_flag_counts(hva: int, npages: int) -> dict[str, int]:
    """How many present pages of the range have PG_dirty / PG_referenced (/proc/kpageflags)."""
    pfns = [p for p in pagemap_pfns(hva, npages) if p]
    flags = kpageflags(pfns)
    return {"present": len(pfns),
            "pg_dirty": sum(1 for f in flags if f >> KPF["dirty"] & 1),
            "pg_referenced": sum(1 for f in flags if f >> KPF["referenced"] & 1)}


class PageIdle:
    """/sys/kernel/mm/page_idle/bitmap: set pages idle, later count the ones still idle."""

    PATH = "/sys/kernel/mm/page_idle/bitmap"

    @classmethod
    def available(cls) -> bool:
        return os.path.exists(cls.PATH)

    @classmethod
    def _rw(cls, pfns, set_idle: bool) -> list[bool]:
        out = []
        fd = os.open(cls.PATH, os.O_RDWR)
        try:
            for pfn in pfns:
                off = (pfn // 64) * 8
                if set_idle:
                    os.pwrite(fd, struct.pack("<Q", 1 << (pfn % 64)), off)
                else:
                    (word,) = struct.unpack("<Q", os.pread(fd, 8, off))
                    out.append(bool(word >> (pfn % 64) & 1))
        finally:
            os.close(fd)
        return out

    @classmethod
    def mark_idle(cls, pfns) -> None:
        cls._rw(pfns, True)

    @classmethod
    def still_idle(cls, pfns) -> int:
        return sum(cls._rw(pfns, False))


_PROBLEM = re.compile(r"WARNING:|BUG:|kernel BUG|Oops|general protection fault|UBSAN:|refcount_t:|"
                      r"list_(add|del) corruption|Bad page")


def kmsg_records() -> list[str]:
    """The first line of every record in the kernel log (:func:`kvmsim.backend.kvm.dmesg.read_kmsg`)."""
    from kvmsim.backend.kvm.dmesg import read_kmsg
    return [text for _, text, _ in read_kmsg()]


def new_problems(before: int) -> tuple[int, list[str]]:
    """(record count now, the WARN/BUG lines logged after the first ``before`` records)."""
    recs = kmsg_records()
    return len(recs), [r for r in recs[before:] if _PROBLEM.search(r)]
