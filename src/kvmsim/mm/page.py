"""Struct pages, folios and the page allocator (include/linux/mm.h, page_ref.h, mm/page_alloc.c, mm/gup.c).

All per-pfn state lives in numpy arrays indexed by pfn, so a 64 GiB guest (16.7 M pages) costs
tens of bytes a page, not a Python object a page:

==============  ======  ==========================================================================
array           dtype   meaning
==============  ======  ==========================================================================
``cls``         u8      :class:`PfnClass` (spec §1.1)
``flags``       u16     :class:`PG` bits; folio-level bits (dirty, referenced) live on the head
``refcount``    i32     the page's own ``_refcount`` field; a large folio's count is on its head,
                        a tail's field is 0 (this is what legacy ``get_page_unless_zero(tail)`` sees)
``pincount``    i32     ``_pincount`` of a large folio (head only)
``head``        i64     pfn of the folio head (itself for small folios and non-compound pages)
``order``       u8      folio order (head only)
``data``        i64     the page's content, as one token (guest/host writes store values here)
``owner``       i32     id of the owning object (address space, anon, driver); 0 = free
``index``       i64     page offset in the owner (``folio->index``)
==============  ======  ==========================================================================

Refcounts model *owner references* (the page cache's or anon mapping's one reference per folio)
plus every GUP / KVM / driver reference; host PTEs do not take their own reference (mapcount is
not modelled), which keeps the lifetime rule simple: a folio is freed when its count reaches 0.

Freeing poisons a page: any later struct-page operation on it, or a data access through a stale
mapping, is recorded as a ``uaf`` fact naming the caller, never silently allowed.

Pfns at or above :data:`NO_PAGE_BASE` have no struct page (MMIO BARs): ``pfn_valid()`` is false.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

import numpy as np

from kvmsim.trace import Journal, Src

GUP_PIN_COUNTING_BIAS = 1 << 10          # include/linux/mm.h
NO_PAGE_BASE = 1 << 40                   # pfns with no struct page (MMIO) start here


class PfnClass(IntEnum):
    """Which kind of memory a pfn is (spec §1.1)."""

    NORMAL = 0
    ZERO = 1
    ZONE_DEVICE = 2
    RESERVED = 3
    NONREFCOUNTED = 4
    DRIVER_REFCOUNTED = 5
    NO_PAGE = 6


class PG(IntFlag):
    """Page flags (include/linux/page-flags.h), plus the model's poison marker."""

    dirty = 1 << 0
    reserved = 1 << 1
    referenced = 1 << 2        # LRU referenced / MGLRU gen: what mark_page_accessed() sets
    head = 1 << 3
    tail = 1 << 4
    hwpoison = 1 << 5
    zone_device = 1 << 6
    writeback = 1 << 7
    lru = 1 << 8
    poisoned = 1 << 9          # freed: any use is a use-after-free
    uptodate = 1 << 10


_DIRTY, _RESERVED, _REFERENCED, _HEAD, _TAIL, _ZONE_DEVICE, _POISONED = (
    int(PG.dirty), int(PG.reserved), int(PG.referenced), int(PG.head), int(PG.tail), int(PG.zone_device),
    int(PG.poisoned))
_UPTODATE = int(PG.uptodate)
_SRC_HELD, _SRC_HOST = Src.HELD, Src.HOST       # per-page code: an enum member lookup costs ~0.1 µs (Python 3.11)


class PhysMem:
    """Model of the host's ``mem_map`` and buddy allocator."""

    def __init__(self, journal: Journal, capacity: int = 1 << 12):
        self.journal = journal
        self._cap = 0
        self.nr = 1                       # pfn 0 is never handed out
        self._free: list[int] = []        # order-0 pfns, reused LIFO (so a stale pfn gets reused)
        self._noio = NO_PAGE_BASE
        self.no_page_data: dict[int, int] = {}
        self.owners: dict[int, object] = {}
        self._next_owner = 1
        self._grow(capacity)
        self.zero_pfn = self.alloc(cls=PfnClass.ZERO, reserved=True, owner=self.register_owner("zero page"))
        self.refcount[self.zero_pfn] = 1
        self.huge_zero_pfn = -1           # allocated on first use (mm_get_huge_zero_folio)

    # ---- storage --------------------------------------------------------------------------
    def reserve(self, npages: int) -> None:
        """Make room for ``npages`` more pfns up front, as the kernel sizes ``mem_map`` at boot.

        Growing by doubling while a large guest populates would leave up to 2x capacity and, during
        the copy, old and new arrays side by side (peak RSS).  The slack covers the alignment of
        1 GiB folios."""
        self._grow(self.nr + npages + 2 * (1 << 18))

    def _grow(self, need: int) -> None:
        if need <= self._cap:
            return
        cap = max(need, self._cap * 2, 1 << 12)
        def grow(arr: np.ndarray | None, dtype: type, fill: int = 0) -> np.ndarray:
            new = np.full(cap, fill, dtype=dtype)
            if arr is not None:
                new[: len(arr)] = arr
            return new
        first = self._cap == 0
        self.cls = grow(None if first else self.cls, np.uint8)
        self.flags = grow(None if first else self.flags, np.uint16)
        self.refcount = grow(None if first else self.refcount, np.int32)
        self.pincount = grow(None if first else self.pincount, np.int32)
        self.head = grow(None if first else self.head, np.int64)
        self.order = grow(None if first else self.order, np.uint8)
        self.data = grow(None if first else self.data, np.int64)
        self.owner = grow(None if first else self.owner, np.int32)
        self.index = grow(None if first else self.index, np.int64)
        self._cap = cap

    def register_owner(self, obj: object) -> int:
        oid = self._next_owner
        self._next_owner += 1
        self.owners[oid] = obj
        return oid

    # ---- allocation -------------------------------------------------------------------------
    def alloc(self, order: int = 0, *, cls: PfnClass = PfnClass.NORMAL, compound: bool = True,
              reserved: bool = False, owner: int = 0, index: int = 0, count: int = 1) -> int:
        """Allocate ``count`` folios of ``2**order`` pages; returns the first head pfn.

        ``compound=False`` gives a non-compound high-order allocation (amdgpu TTM
        ``ttm_pool_alloc_page``): the first page has refcount 1, every other page is its own
        "folio" with refcount 0 and class NONREFCOUNTED.  Folios of order > 0 are naturally aligned.
        """
        if cls == PfnClass.NO_PAGE:
            pfn = self._noio
            self._noio += (1 << order) * count
            return pfn
        if order == 0 and count == 1 and self._free:
            pfn = self._free.pop()
        else:
            size = 1 << order
            start = (self.nr + size - 1) // size * size
            self._grow(start + size * count)
            pfn = start
            self.nr = start + size * count
        self._init_range(pfn, order, count, cls, compound, reserved, owner, index)
        return pfn

    def _init_range(self, pfn: int, order: int, count: int, cls: PfnClass, compound: bool,
                    reserved: bool, owner: int, index: int) -> None:
        if order == 0 and count == 1 and not reserved and cls == PfnClass.NORMAL:
            self.cls[pfn] = 0
            self.flags[pfn] = _UPTODATE
            self.pincount[pfn] = 0
            self.data[pfn] = 0
            self.owner[pfn] = owner
            self.index[pfn] = index
            self.order[pfn] = 0
            self.head[pfn] = pfn
            self.refcount[pfn] = 1
            return
        size = 1 << order
        n = size * count
        sl = slice(pfn, pfn + n)
        base_flags = PG.uptodate | (_RESERVED if reserved else 0) | (_ZONE_DEVICE if cls == PfnClass.ZONE_DEVICE else 0)
        self.cls[sl] = cls
        self.flags[sl] = int(base_flags)
        self.pincount[sl] = 0
        self.data[sl] = 0
        self.owner[sl] = owner
        self.index[sl] = np.arange(index, index + n)
        self.order[sl] = 0
        self.head[sl] = np.arange(pfn, pfn + n)
        initial = 0 if cls == PfnClass.NONREFCOUNTED else 1
        if order == 0:
            self.refcount[sl] = initial
            return
        self.refcount[sl] = 0
        heads = np.arange(pfn, pfn + n, size)
        if not compound:
            # __get_free_pages(order) without __GFP_COMP: only the first page is refcounted; the
            # others are independent pages with _refcount 0 while in use (amdgpu TTM pool).
            self.refcount[heads] = 1
            self.cls[heads] = PfnClass.DRIVER_REFCOUNTED if cls == PfnClass.NONREFCOUNTED else cls
            self.order[heads] = order      # remembered for __free_pages(page, order)
            return
        self.head[sl] = np.repeat(heads, size)
        self.refcount[heads] = initial
        self.order[heads] = order
        self.flags[sl] |= _TAIL
        self.flags[heads] = (self.flags[heads] & ~np.uint16(_TAIL)) | _HEAD

    def free_folio(self, head: int, caller: str) -> None:
        """Return a folio to the buddy allocator and poison it (``free_unref_folios``)."""
        order = int(self.order[head]) if self.flags[head] & _HEAD else 0
        n = 1 << order
        sl = slice(head, head + n)
        if self.flags[head] & _POISONED:
            self.journal.fact("double_free", pfn=head, caller=caller, detail="freeing a freed page")
            return
        if self.flags[head] & _DIRTY and self.owner_can_writeback(head):
            self.journal.fact("freed_dirty", pfn=head, caller=caller,
                              detail="dirty folio freed: unwritten data lost")
        obj = self.owners.get(int(self.owner[head]))
        if getattr(obj, "torn_down", True) is False:
            self.journal.count("premature_free")
            self.journal.fact("premature_free", pfn=head, caller=caller, kvm=caller.startswith("kvm"),
                              detail=f"page freed while its owner {getattr(obj, 'name', '?')} still uses it")
        self.flags[sl] = _POISONED
        self.refcount[sl] = 0
        self.pincount[sl] = 0
        self.owner[sl] = 0
        self.head[sl] = np.arange(head, head + n)
        self.order[sl] = 0
        self.journal.count("page_free", n)
        self.journal.fact("free", pfn=head, caller=caller, extra={"npages": n})
        if n == 1:
            self._free.append(head)
        else:
            self._free.extend(range(head + n - 1, head - 1, -1))

    def has_freed_pages(self) -> bool:
        """Whether some page is freed and not handed out again (PG_poisoned): freed order-0 pages wait
        in the free list until reused, and reuse clears the flag.  A range path checks the page flags
        for a use after free only when this is true."""
        return bool(self._free)

    def owner_can_writeback(self, pfn: int) -> bool:
        obj = self.owners.get(int(self.owner[pfn]))
        return bool(getattr(obj, "can_writeback", False))

    # ---- queries ----------------------------------------------------------------------------
    def pfn_valid(self, pfn: int) -> bool:
        return 0 < pfn < self.nr

    def is_poisoned(self, pfn: int) -> bool:
        return bool(self._free) and 0 < pfn < self.nr and bool(self.flags.item(pfn) & _POISONED)

    def folio(self, pfn: int) -> int:
        """``page_folio()``: the head pfn."""
        return self.head.item(pfn)

    def folio_nr_pages(self, head: int) -> int:
        return 1 << int(self.order[head]) if self.flags[head] & _HEAD else 1

    def page_count(self, pfn: int) -> int:
        """``page_count()``: the folio's refcount."""
        return self.refcount.item(self.head.item(pfn))

    def page_ref_count(self, pfn: int) -> int:
        """``page_ref_count()``: this page's own ``_refcount`` field."""
        return int(self.refcount[pfn])

    def PageReserved(self, pfn: int) -> bool:
        return bool(self.flags.item(pfn) & _RESERVED)

    def is_zero_pfn(self, pfn: int) -> bool:
        return pfn == self.zero_pfn

    def mm_get_huge_zero_folio(self) -> int:
        """``mm_get_huge_zero_folio()`` (mm/huge_memory.c): the huge zero folio's head, allocated on
        first use.  Unlike the 4K zero page it is an ordinary (not reserved) order-9 compound page, so
        GUP takes references on it and KVM's release helpers treat it as a normal page."""
        if self.huge_zero_pfn < 0:
            self.huge_zero_pfn = self.alloc(9, owner=self.register_owner("huge zero folio"))
        return self.huge_zero_pfn

    def is_huge_zero_pfn(self, pfn: int) -> bool:
        """``is_huge_zero_folio(page_folio(pfn_to_page(pfn)))``."""
        return self.huge_zero_pfn >= 0 and 0 <= pfn < self.nr and self.head.item(pfn) == self.huge_zero_pfn

    def is_zone_device(self, pfn: int) -> bool:
        return bool(self.flags.item(pfn) & _ZONE_DEVICE)

    def folio_test_dirty(self, pfn: int) -> bool:
        return bool(self.flags.item(self.head.item(pfn)) & _DIRTY)

    def folio_test_referenced(self, pfn: int) -> bool:
        return bool(self.flags.item(self.head.item(pfn)) & _REFERENCED)

    def pfn_class(self, pfn: int) -> PfnClass:
        if pfn >= NO_PAGE_BASE or not self.pfn_valid(pfn):
            return PfnClass.NO_PAGE
        return PfnClass(int(self.cls[pfn]))

    # ---- reference operations -----------------------------------------------------------------
    def _uaf(self, pfn: int, op: str, caller: str, kvm: bool, source: Src) -> bool:
        # only a page in the free list is poisoned (has_freed_pages()): no flag to read without one
        if self._free and 0 < pfn < self.nr and self.flags.item(pfn) & _POISONED:
            self.journal.count("uaf")
            self.journal.fact("uaf", pfn=pfn, caller=caller, kvm=kvm, source=source,
                              detail=f"{op} on a freed page")
            return True
        return False

    def get_page(self, pfn: int, caller: str, *, kvm: bool = False, source: Src = Src.HOST) -> None:
        """``get_page()`` = ``folio_get(page_folio(page))``: +1 on the folio."""
        if self._uaf(pfn, "get_page", caller, kvm, source):
            return
        head = self.head.item(pfn)
        self.refcount[head] = self.refcount.item(head) + 1
        j = self.journal
        j.count(f"get_page:{caller}")
        if j.recording:
            j.fact("get", pfn=pfn, caller=caller, kvm=kvm, source=source)

    def get_page_unless_zero(self, pfn: int, caller: str, *, kvm: bool = False,
                             source: Src = Src.HOST) -> bool:
        """``get_page_unless_zero()``: acts on this page's own ``_refcount`` field."""
        if self._uaf(pfn, "get_page_unless_zero", caller, kvm, source):
            return False
        if self.refcount[pfn] == 0:
            self.journal.fact("get_unless_zero_failed", pfn=pfn, caller=caller, kvm=kvm, source=source)
            return False
        self.refcount[pfn] += 1
        self.journal.count(f"get_page:{caller}")
        self.journal.fact("get", pfn=pfn, caller=caller, kvm=kvm, source=source)
        return True

    def put_page(self, pfn: int, caller: str, *, kvm: bool = False, source: Src = Src.HOST) -> None:
        """``put_page()``: -1 on the folio; the last put frees it."""
        if self._uaf(pfn, "put_page", caller, kvm, source):
            return
        head = self.head.item(pfn)
        j = self.journal
        j.count(f"put_page:{caller}")
        if j.recording:
            j.fact("put", pfn=pfn, caller=caller, kvm=kvm, source=source)
        ref = self.refcount.item(head)
        if ref <= 0:
            self.journal.count("refcount_underflow")
            self.journal.fact("underflow", pfn=pfn, caller=caller, kvm=kvm, source=source,
                              detail="put_page on a page with refcount 0 (VM_BUG_ON_PAGE)")
            return
        self.refcount[head] = ref - 1
        if ref == 1:
            self.free_folio(head, caller)

    def try_grab_folio(self, pfn: int, pin: bool, caller: str, *, kvm: bool = False) -> None:
        """``try_grab_folio()`` for FOLL_GET (+1) or FOLL_PIN (bias or +1 and pincount)."""
        if not pin:
            self.get_page(pfn, caller, kvm=kvm, source=_SRC_HELD if kvm else _SRC_HOST)
            return
        if self._uaf(pfn, "pin", caller, kvm, Src.HELD):
            return
        head = self.head.item(pfn)
        self.journal.count(f"pin:{caller}")
        self.journal.fact("pin", pfn=pfn, caller=caller, kvm=kvm, source=Src.HELD)
        if pfn == self.zero_pfn:
            return                                  # pinning the zero page is a no-op
        if self.flags[head] & _HEAD:
            self.refcount[head] += 1
            self.pincount[head] += 1
        else:
            self.refcount[head] += GUP_PIN_COUNTING_BIAS

    def unpin_user_page(self, pfn: int, caller: str, *, kvm: bool = False) -> None:
        """``unpin_user_page()``: undoes :meth:`try_grab_folio` with pin."""
        if self._uaf(pfn, "unpin_user_page", caller, kvm, Src.HELD):
            return
        self.journal.count(f"unpin:{caller}")
        self.journal.fact("unpin", pfn=pfn, caller=caller, kvm=kvm, source=Src.HELD)
        if pfn == self.zero_pfn:
            return
        head = int(self.head[pfn])
        if self.flags[head] & _HEAD:
            self.pincount[head] -= 1
            drop = 1
        else:
            drop = GUP_PIN_COUNTING_BIAS
        if self.refcount[head] < drop:
            self.journal.fact("underflow", pfn=pfn, caller=caller, kvm=kvm, source=Src.HELD)
            return
        self.refcount[head] -= drop
        if self.refcount[head] == 0:
            self.free_folio(head, caller)

    def folio_maybe_dma_pinned(self, pfn: int) -> bool:
        head = int(self.head[pfn])
        if self.flags[head] & _HEAD:
            return bool(self.pincount[head] > 0)
        return bool(self.refcount[head] >= GUP_PIN_COUNTING_BIAS)

    # ---- flags ------------------------------------------------------------------------------
    def SetPageDirty(self, pfn: int, caller: str, *, kvm: bool = False, source: Src = Src.HOST,
                     locked: bool = False, gfn: int | None = None) -> None:
        """``SetPageDirty()``: the flag only (KVM's helpers), on the folio."""
        if self._uaf(pfn, "SetPageDirty", caller, kvm, source):
            return
        head = self.head.item(pfn)
        j = self.journal
        j.count(f"set_dirty:{caller}")
        if j.recording:                             # the truncate check only records a fact
            j.fact("set_dirty", pfn=pfn, caller=caller, kvm=kvm, source=source, locked=locked,
                   gfn=gfn, extra={"reserved": bool(self.flags[pfn] & _RESERVED),
                                   "was_dirty": bool(self.flags[head] & _DIRTY)})
            self._dirty_after_clean_check(head, caller, kvm)
        self.flags[head] = self.flags.item(head) | _DIRTY

    def set_folios_dirty(self, heads, caller: str, *, kvm: bool = False) -> None:
        """``SetPageDirty()`` on many folio heads at once (the flag only; counters and facts are the
        caller's): the truncate check once per distinct folio when recording, then the flags."""
        if self.journal.recording:                  # the check only records a fact
            for h in np.unique(heads).tolist():
                self._dirty_after_clean_check(h, caller, kvm)
        self.flags[heads] |= _DIRTY                 # an OR: repeated heads are harmless

    def _dirty_after_clean_check(self, head: int, caller: str, kvm: bool) -> None:
        """Detect a folio dirtied after its mapping was truncated (``filemap_unaccount_folio`` WARN)."""
        obj = self.owners.get(self.owner.item(head))
        if obj is not None and getattr(obj, "truncated", None) is not None and obj.truncated(int(self.index[head])):
            self.journal.fact("dirty_after_truncate", pfn=head, caller=caller, kvm=kvm,
                              detail="folio dirtied after its mapping was truncated")

    def mark_page_accessed(self, pfn: int, caller: str, *, kvm: bool = False, source: Src = Src.HOST,
                           locked: bool = False, gfn: int | None = None, unused: bool = False) -> None:
        """``mark_page_accessed()`` / ``folio_mark_accessed()``."""
        if self._uaf(pfn, "mark_page_accessed", caller, kvm, source):
            return
        head = self.head.item(pfn)
        j = self.journal
        j.count(f"mark_accessed:{caller}")
        if j.recording:
            j.fact("mark_accessed", pfn=pfn, caller=caller, kvm=kvm, source=source, locked=locked,
                   gfn=gfn, extra={"reserved": bool(self.flags[pfn] & _RESERVED), "unused": unused})
        self.flags[head] = self.flags.item(head) | _REFERENCED

    def folio_clear_dirty(self, pfn: int) -> None:
        self.flags[self.head[pfn]] &= ~np.uint16(_DIRTY)

    def folio_test_clear_referenced(self, pfn: int) -> bool:
        head = self.head[pfn]
        was = bool(self.flags[head] & _REFERENCED)
        self.flags[head] &= ~np.uint16(_REFERENCED)
        return was

    # ---- content ------------------------------------------------------------------------------
    def read(self, pfn: int, caller: str, *, kvm: bool = False) -> int:
        if pfn >= NO_PAGE_BASE:
            return self.no_page_data.get(pfn, 0)
        self._uaf(pfn, "read", caller, kvm, Src.SPTE if kvm else Src.HOST)
        return int(self.data[pfn])

    def write(self, pfn: int, value: int, caller: str, *, kvm: bool = False) -> None:
        if pfn >= NO_PAGE_BASE:
            self.no_page_data[pfn] = value
            return
        self._uaf(pfn, "write", caller, kvm, Src.SPTE if kvm else Src.HOST)
        self.data[pfn] = value
