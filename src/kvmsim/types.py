"""Address-space types and page-size arithmetic (include/linux/kvm_types.h, include/asm-generic/page.h).

Guest frame numbers, guest physical addresses, host virtual addresses and host pfns get distinct
types, as rust-vmm's vm-memory does, so that a gfn is never passed where an hva is wanted.
"""

from __future__ import annotations

import re
from typing import NewType

Gfn = NewType("Gfn", int)
Gpa = NewType("Gpa", int)
Hva = NewType("Hva", int)
Pfn = NewType("Pfn", int)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PMD_SHIFT = 21
PUD_SHIFT = 30
PMD_SIZE = 1 << PMD_SHIFT
PUD_SIZE = 1 << PUD_SHIFT
PAGES_PER_PMD = PMD_SIZE // PAGE_SIZE      # 512
PAGES_PER_PUD = PUD_SIZE // PAGE_SIZE      # 262,144

# PG_LEVEL_4K / 2M / 1G (arch/x86/include/asm/pgtable_types.h); also used for host mapping levels.
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
LEVEL_PAGES = {PG_LEVEL_4K: 1, PG_LEVEL_2M: PAGES_PER_PMD, PG_LEVEL_1G: PAGES_PER_PUD}
LEVEL_NAMES = {PG_LEVEL_4K: "4K", PG_LEVEL_2M: "2M", PG_LEVEL_1G: "1G"}

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse ``4K``, ``2M``, ``1G``, ``64GiB`` or a plain byte count into bytes.

    Raises ``ValueError`` with the offending text for anything else.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a size such as 4K, 2M or 1G, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected a size such as 4K, 2M or 1G, got {text!r}")
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"expected a size such as 4K, 2M or 1G, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(nbytes: int) -> str:
    """The inverse of :func:`parse_size` for round sizes: ``format_size(1 << 30) == "1G"``."""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes and nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return str(nbytes)
