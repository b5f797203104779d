"""Scenario ops for ``arch = "ppc-e500"`` (arch/powerpc/kvm/e500_mmu.c ``kvmppc_e500_emul_tlbwe()``).

``tlbwe`` writes a guest TLB entry and premaps it (:meth:`kvmsim.ppc.e500_mmu_host.E500Mmu.kvmppc_e500_emul_tlbwe`)::

    [[step]]
    op = "tlbwe"
    tlb = 1                 # 0: TLB0 (always 4K), 1: TLB1 (size from "size")
    esel = 0                # entry index (TLB0 < 512, TLB1 < 64)
    gpa = "1G"              # MAS7_3 real address (aligned down to the size)
    ea = "1G"               # MAS2 effective address (default: gpa)
    size = "16K"            # TLB1 page size: a power of two from 4K (e500 drops odd TSIZE values)
    mas3 = ["SR", "SW", "UR", "UW"]   # MAS3 permissions (default: all six)

Its result is the premap's ``kvmppc_e500_shadow_map()`` return: ``ok`` (0), ``retry`` (-EAGAIN) or
``error`` with errno EINVAL; ``nomap`` when the entry is not host safe (no memslot at ``gpa``).
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.scenarios.env import Env, Res
from kvmsim.scenarios.loader import REQUIRED, c_bounded, c_int, c_size, c_strlist

_MAS3_NAMES = ("SR", "SW", "SX", "UR", "UW", "UX")


def c_mas3(v) -> tuple[str, ...]:
    names = tuple(n.upper().removeprefix("MAS3_") for n in c_strlist(v))
    for n in names:
        if n not in _MAS3_NAMES:
            raise ValueError(f"expected MAS3 permissions from {', '.join(_MAS3_NAMES)}, got {n!r}")
    return names


PPC_E500_OP_ARGS = {
    "tlbwe": {"tlb": (c_bounded(c_int, 0, 1, "a TLB number (0 or 1)"), REQUIRED), "esel": (c_int, 0),
              "gpa": (c_size, REQUIRED), "ea": (c_size, None), "size": (c_size, 4096),
              "mas3": (c_mas3, _MAS3_NAMES), "vcpu": (c_int, 0)},
}


def op_tlbwe(env: Env, a: dict):
    from kvmsim.ppc.e500_mmu_host import MAS3, E500Mmu
    mmu = env.kvm.arch
    if not isinstance(mmu, E500Mmu):
        raise ModelError(errno.EINVAL, 'tlbwe is an e500 guest TLB write: it needs arch = "ppc-e500"')
    size = a["size"]
    if size < 4096 or size & (size - 1):
        raise ModelError(errno.EINVAL, f"tlbwe: size {size:#x} is not a power of two from 4K")
    mas3 = MAS3(0)
    for n in a["mas3"]:
        mas3 |= MAS3[n]
    gpa = a["gpa"]
    ea = gpa if a["ea"] is None else a["ea"]
    was = env.kvm.gfn_to_memslot(gpa >> 12) is not None
    r = yield from mmu.kvmppc_e500_emul_tlbwe.steps(env.vcpu(a["vcpu"]), a["tlb"], a["esel"], ea, gpa,
                                                    size.bit_length() - 1 - 10, mas3)
    if r == -errno.EAGAIN:
        return Res("retry", errno.EAGAIN)
    if r < 0:
        return Res("error", -r)
    return Res("ok" if was else "nomap")


PPC_E500_OPS = {"tlbwe": op_tlbwe}
