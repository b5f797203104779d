"""The hardware-mode conformance suite: cases run on every oracle kernel (agent.py) and on the model in
hardware mode under that kernel's protocol (model_side.py), compared phase by phase (compare.py).

Every case runs on a fresh VM with one vCPU, its data memslot at guest physical 1 GiB (slot 1), and
names what it compares (``compare``): always ``out`` (errnos, exits, values, dirty bitmaps, ring
entries the VMM saw), then stats deltas and kernel-function call counts by name.  The default is
:data:`STRUCT_PAGE_CALLS` + :data:`MMU_STATS`.  ``phases`` limits counting comparisons to some phases
(setup phases that only create mappings are still compared on ``out``).

The cases live in cases_hostops.py, cases_dirty.py and cases_vm.py (imported at the end of this module,
which registers them in this order); this module holds the registry and the fault cases.

Sizes are small (64-256 pages) because a slow-path NPT fault costs 70-90 us under TCG; the README
table case uses 1,000 pages as ../shared/oracle/README.md does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmsim.uapi import KVM_MEM
from kvmsim.backend.base import MappingKind, page_gpas
from kvmsim.backend.oracle.side import HUGETLB_1G, Side

GPA = 1 << 30
LOG = KVM_MEM.LOG_DIRTY_PAGES
M2 = 2 << 20
G1 = 1 << 30
MADV_PAGEOUT = 21
MADV_COLLAPSE = 25

# The kernel functions whose call counts the cases compare by default (docs/oracle.md maps each to
# the model's counters); a function a kernel lacks must have 0 calls in the model.
STRUCT_PAGE_CALLS = ("kvm_set_pfn_dirty", "kvm_set_pfn_accessed", "kvm_release_pfn_clean",
                     "kvm_release_pfn_dirty", "kvm_release_page_clean", "kvm_release_page_dirty",
                     "kvm_release_page_unused")
MMU_STATS = ("pages_4k", "pages_2m", "pages_1g", "pf_taken", "pf_fast")
DEFAULT_COMPARE = ("out",) + MMU_STATS + STRUCT_PAGE_CALLS


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    fn: Callable[[Side], None]
    compare: tuple[str, ...] = DEFAULT_COMPARE
    doc: str = ""


CASES: list[Case] = []


def case(group: str, compare: tuple[str, ...] = DEFAULT_COMPARE, name: str | None = None):
    def deco(fn):
        CASES.append(Case(name or fn.__name__.replace("_", "-"), group, fn, compare,
                          (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""))
        return fn
    return deco


def _kind_case(kind, size: int, stride: int, first: str):
    """first-touch and repeated faults on one kind of backing: ``first`` is "write" or "read"."""
    def fn(s: Side) -> None:
        s.begin()
        with s.phase("map"):
            m = s.map(kind, size)
            s.note("slot", s.slot(m))
        gpas = page_gpas(GPA, size // 4096)[::stride]
        with s.phase(f"first {first}"):
            s.write(gpas, 0x11) if first == "write" else s.read(gpas)
        with s.phase("write"):
            s.write(gpas, 0x22)
        with s.phase("write again"):
            s.write(gpas, 0x33)
        with s.phase("read"):
            s.read(gpas)
    return fn


_KINDS = [("anon-private", MappingKind.ANON_PRIVATE, 256 * 4096, 1),
          ("anon-shared", MappingKind.ANON_SHARED, 256 * 4096, 1),
          ("memfd", MappingKind.MEMFD, 256 * 4096, 1),
          ("thp", MappingKind.THP_ANON, 4 * M2, 64),
          ("hugetlb-2M", MappingKind.HUGETLB_2M, 4 * M2, 64),
          ("hugetlb-1G", HUGETLB_1G, G1, 4096)]
for _label, _kind, _size, _stride in _KINDS:
    for _first in ("write", "read"):
        case("fault", name=f"first-{_first}-{_label}")(_kind_case(_kind, _size, _stride, _first))



TABLE_CASE = "readme-table"

# The other groups register themselves on import, in this order.
from kvmsim.backend.oracle import cases_hostops, cases_dirty, cases_vm  # noqa: E402,F401
