"""The model beside a real oracle kernel: ``ModelBackend`` in ``hardware`` mode under the kernel's
protocol (legacy for v6.12, series for v6.13), with AMD SVM's MMU settings (no PML, so dirty logging
write-protects: arch/x86/kvm/svm has no PML), and its cost counters mapped to the kernel functions the
agent probes.

The mapping (docs/oracle.md has it as a table, tests/oracle/test_mapping.py tests each row): the model
counts struct-page operations by the KVM function that made them (``set_dirty:<caller>``,
``mark_accessed:<caller>``, ``put_page:<caller>``, kvmsim/mm/page.py), so a kernel function's calls are
a sum over callers:

v6.12 (legacy, virt/kvm/kvm_main.c):
  ``kvm_release_pfn_clean``  = ``put_page:kvm_release_pfn_clean`` (one put per call on a refcounted page)
  ``kvm_release_pfn_dirty``  = ``put_page:kvm_release_pfn_dirty``
  ``kvm_set_pfn_dirty``      = every KVM ``set_dirty:*`` except the page-based helpers (``kvm_release_page_dirty``,
                               ``kvm_vcpu_unmap``); it includes ``kvm_release_pfn_dirty``'s own call
  ``kvm_set_pfn_accessed``   = every KVM ``mark_accessed:*`` except the release helpers
  ``kvm_release_page_clean`` = ``mark_accessed`` by ``kvm_release_pfn_clean/dirty`` (they call it) + direct calls
v6.13 (series; ``kvm_release_faultin_page()`` is a static inline in include/linux/kvm_host.h, so absent):
  ``kvm_release_page_dirty`` = ``set_dirty:kvm_release_faultin_page`` + ``set_dirty:kvm_release_page_dirty``
  ``kvm_release_page_clean`` = ``mark_accessed`` by the release helpers (kvm_release_page_dirty calls it)
  ``kvm_release_page_unused``= puts by ``kvm_release_faultin_page`` with no accessed mark
  ``kvm_set_pfn_dirty``/``kvm_set_pfn_accessed``/``kvm_release_pfn_*``: removed by the series; the
                               model must show 0 calls where the kernel shows "absent".
Both: ``mark_page_accessed`` = every ``mark_accessed:*`` (KVM's and GUP's ``follow_page_pte`` FOLL_TOUCH).
Stats: ``pages_4k/2m/1g`` = leaves in the model's TDP tables; ``pf_taken`` = ``page_fault``;
``pf_fast`` = ``fast_page_fault``.
"""

from __future__ import annotations

import errno
from collections import Counter

from kvmsim.backend import base
from kvmsim.backend.base import HostMapping, MappingKind, VmOptions
from kvmsim.backend.model import ModelBackend
from kvmsim.backend.oracle.side import CaseSkipped, Side
from kvmsim.errors import ModelError
from kvmsim.types import PAGE_SIZE, Hva

_PAGE_HELPERS = ("kvm_release_page_dirty", "kvm_release_page_clean", "kvm_vcpu_unmap")
_RELEASES_LEGACY = ("kvm_release_pfn_clean", "kvm_release_pfn_dirty")
_HOST_CALLERS = ("follow_page_pte:FOLL_TOUCH", "folio_mark_dirty")
_GUP_TOUCH = "follow_page_pte:FOLL_TOUCH"

# The model's own mirrors of the kernel's release helpers (kvmsim/kvm/pfn.py), counted per call the way
# a kprobe counts the kernel function: "model kprobes".
PROBED_MODEL_FUNCTIONS = ("kvm_release_page_clean", "kvm_release_page_dirty", "kvm_release_page_unused",
                          "kvm_release_pfn", "kvm_set_pfn_dirty", "kvm_set_pfn_accessed")

# Where a kernel build inlines one probed function into another, the probe misses those calls:
# v6.13.7 inlines kvm_release_page_clean() into kvm_release_page_dirty() (both in virt/kvm/kvm_main.c).
INLINED = {"series": {("kvm_release_page_dirty", "kvm_release_page_clean")}, "legacy": set()}


def _sum(c: dict, prefix: str, keep) -> int:
    return sum(v for k, v in c.items() if k.startswith(prefix) and keep(k[len(prefix):]))


def legacy_calls(c: dict, calls: dict) -> dict[str, int | None]:
    """v6.12 kernel-function calls from the model's counters and model kprobes (module docstring)."""
    return {
        "kvm_release_pfn_clean": calls.get("kvm_release_pfn_clean", 0),
        "kvm_release_pfn_dirty": calls.get("kvm_release_pfn_dirty", 0),
        # v6.12's kvm_release_page_dirty() calls kvm_release_page_clean() (not inlined in that build);
        # the model's kvm_release_page_dirty() has it inlined (kvmsim/kvm/pfn.py), so it counts here too
        "kvm_release_page_clean": calls.get("kvm_release_page_clean", 0) + calls.get("kvm_release_page_dirty", 0),
        "kvm_release_page_dirty": calls.get("kvm_release_page_dirty", 0),
        "kvm_release_page_unused": calls.get("kvm_release_page_unused", 0),
        # scalar calls of the model's kvm_set_pfn_dirty/accessed plus one per SPTE whose D/A bit
        # LegacyPolicy.spte_ad_lost_bulk() pushes to the folio (the vectorised zap/write-protect paths)
        "kvm_set_pfn_dirty": calls.get("kvm_set_pfn_dirty", 0),
        "kvm_set_pfn_accessed": calls.get("kvm_set_pfn_accessed", 0),
        # v6.12's follow_page_pte() calls mark_page_accessed() (FOLL_TOUCH), as KVM's helpers do
        "mark_page_accessed": _sum(c, "mark_accessed:", lambda k: True),
    }


def series_calls(c: dict, calls: dict) -> dict[str, int | None]:
    """v6.13 kernel-function calls from the model's counters and model kprobes (module docstring)."""
    return {
        "kvm_release_pfn_clean": 0, "kvm_release_pfn_dirty": 0, "kvm_set_pfn_dirty": 0,
        "kvm_set_pfn_accessed": 0,
        "kvm_release_page_clean": calls.get("kvm_release_page_clean", 0),
        "kvm_release_page_dirty": calls.get("kvm_release_page_dirty", 0),
        # a static inline in include/linux/kvm_host.h since the series: no probe can see it, so the
        # model's count is not comparable (the retries it releases still show in pf_taken)
        "kvm_release_page_unused": None,
        # v6.13's follow_page_pte() calls folio_mark_accessed() directly: only KVM's marks are seen here
        "mark_page_accessed": _sum(c, "mark_accessed:", lambda k: k != _GUP_TOUCH),
    }


class ModelKprobes:
    """Count calls of the model's mirror functions while installed (``with ModelKprobes(policy) as kp``).

    Each ``kvmsim.*`` module that holds one of :data:`PROBED_MODEL_FUNCTIONS` gets a counting wrapper
    for the time of the ``with`` block; ``kvm_release_pfn(kvm, pfn, dirty, ...)`` counts as
    ``kvm_release_pfn_dirty`` or ``kvm_release_pfn_clean``.  Calls the kernel build inlines
    (:data:`INLINED`) are not counted."""

    def __init__(self, policy: str):
        self.inlined = INLINED.get(policy, set())
        self.calls: Counter[str] = Counter()
        self._stack: list[str] = []
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, fn):
        def probe(*args, **kwargs):
            label = name
            if name == "kvm_release_pfn":
                dirty = args[2] if len(args) > 2 else kwargs.get("dirty")
                label = "kvm_release_pfn_dirty" if dirty else "kvm_release_pfn_clean"
            if not (self._stack and (self._stack[-1], label) in self.inlined):
                self.calls[label] += 1
            self._stack.append(label)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
        probe.__wrapped__ = fn
        return probe

    # every module that imports a probed function by name; imported here, before patching, because
    # the policies are imported lazily when the first VM is created
    HOLDERS = ("kvmsim.kvm.pfn", "kvmsim.policies.legacy", "kvmsim.policies.series", "kvmsim.policies.pre513",
               "kvmsim.kvm.host_map", "kvmsim.kvm.pfncache", "kvmsim.kvm.kvm", "kvmsim.x86.mmu")

    def __enter__(self) -> ModelKprobes:
        import importlib
        import sys
        for name in self.HOLDERS:
            importlib.import_module(name)
        import kvmsim.kvm.pfn as pfn
        originals = {n: getattr(pfn, n) for n in PROBED_MODEL_FUNCTIONS}
        wrappers = {n: self._wrap(n, f) for n, f in originals.items()}
        for mod in [m for k, m in list(sys.modules.items()) if k.startswith("kvmsim.") and m is not None]:
            for n, f in originals.items():
                if getattr(mod, n, None) is f:
                    self._saved.append((mod, n, f))
                    setattr(mod, n, wrappers[n])
        # the vectorised legacy zap / write-protect path: one kvm_set_pfn_dirty (accessed) per pfn that
        # LegacyPolicy.spte_ad_lost_bulk() hands to folio_ops (counted where the marks are made, so a
        # change to the masks shows)
        import kvmsim.kvm.pfn_bulk as folio_ops
        from kvmsim.policies.legacy import LegacyPolicy
        stack, calls = self._stack, self.calls
        bulk = LegacyPolicy.spte_ad_lost_bulk

        def spte_ad_lost_bulk(policy, kvm, pfns, dirty_mask, accessed_mask, caller):
            stack.append("spte_ad_lost_bulk")
            try:
                return bulk(policy, kvm, pfns, dirty_mask, accessed_mask, caller)
            finally:
                stack.pop()
        spte_ad_lost_bulk.__wrapped__ = bulk
        self._saved.append((LegacyPolicy, "spte_ad_lost_bulk", bulk))
        LegacyPolicy.spte_ad_lost_bulk = spte_ad_lost_bulk
        for helper, fn_name in (("set_page_dirty_bulk", "kvm_set_pfn_dirty"),
                                ("mark_page_accessed_bulk", "kvm_set_pfn_accessed")):
            orig = getattr(folio_ops, helper)

            def counted(kvm, pfns, *a, _orig=orig, _fn=fn_name, **k):
                if stack and stack[-1] == "spte_ad_lost_bulk":
                    calls[_fn] += len(pfns)
                return _orig(kvm, pfns, *a, **k)
            counted.__wrapped__ = orig
            self._saved.append((folio_ops, helper, orig))
            setattr(folio_ops, helper, counted)
        return self

    def __exit__(self, *exc) -> None:
        for holder, n, f in reversed(self._saved):
            setattr(holder, n, f)
        self._saved.clear()


CALL_MAPS = {"legacy": legacy_calls, "series": series_calls}


class OracleModelBackend(ModelBackend):
    """``ModelBackend`` in hardware mode with the x86 MMU configured as KVM runs on AMD SVM with NPT:
    TDP MMU, no PML (dirty logging write-protects), A/D bits, eager page splitting on; for a v6.13
    kernel also the model's "[6.13-other]" MMU changes (``v613_other``: huge pages recovered in place
    when logging stops, no TLB flush on aging), which v6.13 has besides the series."""

    def __init__(self, policy: str, v613_other: bool = False, release: tuple[int, int] = (6, 13)):
        from kvmsim.mm.huge_memory import set_host_kernel
        super().__init__(policy, "hardware", hugetlb_pages=64)
        self.v613_other = v613_other
        # the booted kernel's host mm (the huge zero PMD write fault), and the oracle guest has no swap
        set_host_kernel(self.host.mm, release)
        self.host.mm.total_swap_pages = 0

    def _kvm_options(self) -> dict:
        """Hardware mode as under SVM/TCG: no PML; 6.13 kernels also get the other 6.13 MMU changes."""
        return {"pml": False, "v613_other": self.v613_other}


class ModelSide(Side):
    """The model under ``policy``, counting as the kernel would be counted."""

    name = "model"

    def __init__(self, policy: str, release: str | None = None):
        from kvmsim.backend.oracle.kernels import parse_release
        super().__init__()
        self.policy = policy
        self._calls = CALL_MAPS[policy]
        if release is None:
            release = "6.13" if policy == "series" else "6.12"
        self.release = tuple(parse_release(release)[:2])
        self.v613_other = self.release >= (6, 13)

    def new_backend(self, options: VmOptions) -> OracleModelBackend:
        return OracleModelBackend(self.policy, self.v613_other, self.release)

    def begin(self, options: VmOptions = VmOptions()) -> None:
        self.kprobes = ModelKprobes(self.policy).__enter__()
        super().begin(options)

    def end(self) -> None:
        try:
            super().end()
        finally:
            kp = getattr(self, "kprobes", None)
            if kp is not None:
                kp.__exit__(None, None, None)
                self.kprobes = None

    def counts(self) -> dict:
        kvm = self.b.kvm
        c = kvm.journal.counters
        out = dict(kvm.arch.stats())
        out["pf_taken"] = c.get("page_fault", 0)
        out["pf_fast"] = c.get("fast_page_fault", 0)
        out.update(self._calls(c, self.kprobes.calls))
        return out

    def settle(self) -> None:
        """As RealSide.settle: every boot page written by the host, then read-faulted into the TDP MMU."""
        b = self.b
        for a in range(int(b._boot.start), int(b._boot.start) + int(base.BOOT_GPA_END), PAGE_SIZE):
            b.host.mm.host_access(a, True, 0)
        self.resettle()

    def resettle(self) -> None:
        self.pre_fault(0, int(base.BOOT_GPA_END))

    def map_hugetlb_1g(self, size: int) -> HostMapping:
        from kvmsim.mm.vma import VmaKind
        b = self.b
        try:
            vma = b.host.mm.mmap(size, VmaKind.HUGETLB, page_size=1 << 30)
        except ModelError as e:
            raise CaseSkipped(f"1 GiB hugetlb: {e}") from None
        mid = b._next_id
        b._next_id += 1
        m = HostMapping(mid, MappingKind.MEMFD, Hva(vma.start), size)
        b._maps[mid] = (m, vma)
        return m

    def madvise_raw(self, m: HostMapping, advice: int, offset: int = 0, length: int | None = None) -> int:
        from kvmsim.mm.reclaim import thp_collapse
        start, n = int(m.hva) + offset, length if length is not None else m.size - offset
        try:
            if advice == 25:                                  # MADV_COLLAPSE
                for a in range(start, start + n, 2 << 20):
                    thp_collapse(self.b.host.mm, a)
            elif advice in (20, 21):                          # MADV_COLD, MADV_PAGEOUT
                self.b.host.mm.madvise(start, n, "COLD" if advice == 20 else "PAGEOUT")
            else:
                return errno.EINVAL
        except ModelError as e:
            return e.errno
        return 0

    def pre_fault(self, gpa: int, size: int) -> int:
        """Modelled as a read fault per page (``kvm_arch_vcpu_pre_fault_memory()`` maps with a read
        error code through ``kvm_tdp_map_page()``); ENOENT outside every memslot."""
        kvm = self.b.kvm
        taken = kvm.journal.counters.get("page_fault", 0)
        try:
            for g in range(gpa, gpa + size, PAGE_SIZE):
                if kvm.gfn_to_memslot(g >> 12) is None:
                    # kvm_tdp_map_page(): the fault runs and ends as any noslot fault does (v6.12 releases
                    # KVM_PFN_NOSLOT); its RET_PF_EMULATE is -ENOENT
                    kvm.arch.page_fault(self.b.vcpu, g, False)
                    return errno.ENOENT
                self.b.vcpu.access(g, False)
        finally:
            # kvm_tdp_map_page() faults with prefetch=true: kvm_mmu_do_page_fault() counts pf_taken only
            # for !prefetch (arch/x86/kvm/mmu/mmu_internal.h)
            kvm.journal.counters["page_fault"] = taken
        return 0

    def require_vm_flag(self, m: HostMapping, flag: str, why: str) -> None:
        """The model's mapping kinds have fixed flags: nothing to check."""

    def vm_flags(self, m: HostMapping) -> str:
        vma = self.b._maps[m.id][1]
        return f"{vma.kind.value} {vma.flags!r}"

    def page_flags(self, m: HostMapping, npages: int) -> dict:
        from kvmsim.mm.page import PG
        from kvmsim.mm.vma import Pte
        mm, phys = self.b.host.mm, self.b.host.phys
        present = dirty = ref = 0
        for i in range(npages):
            _, pfn, bits, _ = mm.pte_of(int(m.hva) + i * PAGE_SIZE)
            if pfn < 0 or not bits & Pte.PRESENT:
                continue
            present += 1
            head = int(phys.head[pfn])
            dirty += bool(phys.flags[head] & PG.dirty)
            ref += bool(phys.flags[head] & PG.referenced)
        return {"present": present, "pg_dirty": dirty, "pg_referenced": ref}
