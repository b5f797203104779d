"""Hypothesis strategies shared by the test folders (one place, as STYLE.md asks).

Sizes are parameters, not globals, so each state machine draws over its own memslot.
"""

from __future__ import annotations

from hypothesis import strategies as st

from kvmsim.backend.base import MappingKind
from kvmsim.mm.vma import VmaKind

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
