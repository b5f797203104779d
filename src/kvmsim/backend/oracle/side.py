"""One side of an oracle comparison: the API the cases of cases.py are written against, and the
per-phase record both sides produce.

A case runs on a fresh VM (``Side.begin``) and splits its work into named phases.  For each phase a side
records ``out`` (what the VMM saw: errnos, exits, values, dirty bitmaps, ring entries, page flags) and
``counts`` (the deltas of the KVM binary stats and of the calls of each kernel function; ``None`` =
the kernel has no such function).  The real side (agent.py) fills ``counts`` from the binary stats fd
and kprobes; the model side (model_side.py) from the model's stats and cost counters, mapped to the
kernel's function names by the table in model_side.py.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

from kvmsim.uapi import KVM_MEM
from kvmsim.backend.base import (Backend, GuestAccessOutcome, HostMapping, MappingKind, MemoryRegion,
                                 VmOptions)
from kvmsim.types import Gpa

HUGETLB_1G = "hugetlb-1G"        # a kind the Backend protocol lacks: memfd(MFD_HUGETLB|MFD_HUGE_1GB)


class CaseSkipped(Exception):
    """The case cannot run on this side (a capability missing); the message says which."""


def summarize(o: GuestAccessOutcome) -> dict:
    """Exits and values of guest accesses, as counters (compact and order-free) plus completeness."""
    exits = Counter(a.exit.value for a in o.accesses)
    vals = Counter(str(a.value) for a in o.accesses if not a.write)
    out = {"exits": dict(sorted(exits.items())), "complete": o.complete}
    if vals:
        out["values"] = dict(sorted(vals.items()))
    return out


@dataclass
class Phase:
    name: str
    out: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)          # recorded, never compared


class Side:
    """Base of RealSide and ModelSide: phases and notes; subclasses provide the backend and counters."""

    policy: str
    b: Backend

    def __init__(self) -> None:
        self.phases: list[Phase] = []
        self._cur: Phase | None = None
        self._n = 0

    # ---- subclass hooks -------------------------------------------------------------------------
    def new_backend(self, options: VmOptions) -> Backend:
        raise NotImplementedError

    def counts(self) -> dict:
        """Current absolute values: stats and kernel-function call counts (None = absent)."""
        raise NotImplementedError

    def map_hugetlb_1g(self, size: int) -> HostMapping:
        raise NotImplementedError

    def madvise_raw(self, m: HostMapping, advice: int, offset: int = 0, length: int | None = None) -> int:
        raise NotImplementedError

    def pre_fault(self, gpa: int, size: int) -> int:
        raise NotImplementedError

    def page_flags(self, m: HostMapping, npages: int) -> dict:
        raise NotImplementedError

    def idle_after(self, m: HostMapping, npages: int, touch) -> dict | None:
        """Mark the mapping's pages idle (/sys/kernel/mm/page_idle), run ``touch()``, count the pages
        still idle; None where page_idle is not available (the model: recorded, not compared)."""
        touch()
        return None

    def require_vm_flag(self, m: HostMapping, flag: str, why: str) -> None:
        """Skip the case where the real mapping lacks a smaps VmFlags flag (e.g. ``pf``); the model's
        mapping kinds have fixed flags, so only the real side checks."""
        flags = self.vm_flags(m)
        if flags and flag not in flags.split():
            raise CaseSkipped(f"{why} (VmFlags: {flags})")

    def vm_flags(self, m: HostMapping) -> str:
        """The VMA flags behind ``m`` (smaps ``VmFlags`` on the real side), for the record."""
        return ""

    # ---- case API ---------------------------------------------------------------------------------
    def begin(self, options: VmOptions = VmOptions()) -> None:
        self.phases = []
        self._zap_all_pending = False
        self.b = self.new_backend(options)
        self.b.create_vm(options)
        self.settle()

    def settle(self) -> None:
        """Bring the VM to a state where the case's first phase counts only its own work."""

    def resettle(self) -> None:
        """Map the boot slot again wherever a zap removed it, so that a phase counts the case's memory
        only, never the guest's own code, page tables and address lists faulting back in (which the
        model does not execute).  Called before a phase that follows a memslot delete or move:
        KVM_X86_QUIRK_SLOT_ZAP_ALL (on by default) makes those zap every SPTE of the VM
        (arch/x86/kvm/mmu/mmu.c ``kvm_arch_flush_shadow_memslot()`` → ``kvm_mmu_zap_all_fast()``)."""

    def end(self) -> None:
        if getattr(self, "b", None) is not None:
            self.b.close()
            self.b = None

    @contextlib.contextmanager
    def phase(self, name: str):
        ph = Phase(name)
        if self._zap_all_pending:
            self.resettle()
            self._zap_all_pending = False
        slots = {k: r.guest_phys_addr for k, r in self.b.memslots().items()}
        before = self.counts()
        self._cur = ph
        try:
            yield ph
        finally:
            self._cur = None
            after = self.counts()
            ph.counts = _delta(after, before)
            self.phases.append(ph)
            now = {k: r.guest_phys_addr for k, r in self.b.memslots().items()}
            self._zap_all_pending = any(now.get(k) != g for k, g in slots.items())

    def note(self, key: str, value) -> None:
        if self._cur is None:
            raise RuntimeError("note() outside a phase")
        self._cur.out[key] = value

    def info(self, key: str, value) -> None:
        """Record ``value`` in the current phase without comparing it."""
        if self._cur is None:
            raise RuntimeError("info() outside a phase")
        self._cur.info[key] = value

    # ---- helpers used by many cases ---------------------------------------------------------------
    def map(self, kind, size: int) -> HostMapping:
        if kind == HUGETLB_1G:
            return self.map_hugetlb_1g(size)
        r = self.b.host_mmap(kind, size)
        if not r.ok:
            raise CaseSkipped(f"mmap {kind.value} of {size} bytes failed with errno {r.errno}")
        return r.mapping

    def slot(self, m: HostMapping, slot: int = 1, gpa: int = 1 << 30, flags: KVM_MEM = KVM_MEM(0),
             size: int | None = None) -> int:
        r = self.b.set_memory_region(MemoryRegion(slot, Gpa(gpa), size or m.size, m.hva, KVM_MEM(flags)))
        return r.errno

    def write(self, gpas, value: int, key: str = "write") -> dict:
        s = summarize(self.b.guest_write(list(gpas), value))
        self.note(key, s)
        return s

    def read(self, gpas, key: str = "read") -> dict:
        s = summarize(self.b.guest_read(list(gpas)))
        self.note(key, s)
        return s


def _delta(after: dict, before: dict) -> dict:
    out = {}
    for k, v in after.items():
        b = before.get(k)
        out[k] = None if v is None or b is None else v - b
    return out
