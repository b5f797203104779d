"""Scenario ops for x86 shadow paging (:mod:`kvmsim.x86.paging_tmpl`) and KVM_PRE_FAULT_MEMORY
(:mod:`kvmsim.x86.prefault`).

* ``guest_pte_write``: the guest stores a gPTE mapping ``gva`` → ``gpa`` with ``flags`` (``present``,
  ``writable``, ``user``, ``accessed``, ``dirty``, ``nx``) in its page-table page at gpa ``pt`` (needed for
  the first gPTE of a 2 MiB gva block); the store is a guest write through the MMU.  Needs
  ``mmu = "shadow"`` and ``paging = "indirect"`` in ``[vm]``.  Result ``ok`` or the store's exit.
* ``invlpg``: the guest's INVLPG of ``gva`` (``kvm_mmu_invalidate_addr()``: syncs an unsync SPTE);
  ``cr3_load``: a CR3 load that syncs every unsync shadow page (``kvm_mmu_sync_roots()``).  Both
  steppable; result ``flush`` or ``no-flush``.
* ``pre_fault_memory``: KVM_PRE_FAULT_MEMORY on ``gpa``/``size`` (``flags`` must be 0); result ``ok``
  (``value`` is the bytes left in ``range.size``, 0 when all were mapped) or the ioctl's errno.

Under ``paging = "indirect"`` the guest ops' ``gpa`` (``read``, ``write``, ``fault``) is a guest *virtual*
address, translated by the guest's page tables (identity where no gPTE was written).
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError, errno_name
from kvmsim.scenarios.env import Env, Res, _done
from kvmsim.scenarios.loader import REQUIRED, c_int, c_size, c_strlist
from kvmsim.types import PAGE_SIZE

GPTE_FLAGS = ("present", "writable", "user", "accessed", "dirty", "nx")


def c_gpte_flags(v) -> tuple[str, ...]:
    names = [n.lower() for n in c_strlist(v)]
    for n in names:
        if n not in GPTE_FLAGS:
            raise ValueError(f"expected gPTE flags from {', '.join(GPTE_FLAGS)}, got {n!r}")
    return tuple(names)


X86_SHADOW_OP_ARGS = {
    "guest_pte_write": {"gva": (c_size, REQUIRED), "gpa": (c_size, REQUIRED),
                        "flags": (c_gpte_flags, ("present", "writable", "accessed", "dirty")),
                        "pt": (c_size, None), "vcpu": (c_int, 0)},
    "invlpg": {"gva": (c_size, REQUIRED), "vcpu": (c_int, 0)},
    "cr3_load": {"vcpu": (c_int, 0)},
    "pre_fault_memory": {"gpa": (c_size, REQUIRED), "size": (c_size, PAGE_SIZE), "flags": (c_int, 0),
                         "vcpu": (c_int, 0)},
}


def _indirect(env: Env, op: str):
    from kvmsim.x86.shadow_mmu import IndirectShadowMmu
    mmu = env.kvm.arch
    if not isinstance(mmu, IndirectShadowMmu):
        raise ModelError(errno.EINVAL, f"{op} is x86 shadow paging: it needs mmu = \"shadow\" and "
                                       "paging = \"indirect\" in [vm]")
    return mmu


def op_guest_pte_write(env: Env, a: dict):
    from kvmsim.x86.paging_tmpl import PT, guest_pte_write
    mmu = _indirect(env, "guest_pte_write")
    flags = PT(0)
    for n in a["flags"]:
        flags |= PT[n.upper()]
    acc = guest_pte_write(mmu, env.vcpu(a["vcpu"]), a["gva"], a["gpa"], flags, a["pt"])
    yield from _done("guest: gPTE stored")
    return Res(acc.exit.value, acc.errno)


def op_invlpg(env: Env, a: dict):
    from kvmsim.x86.paging_tmpl import kvm_mmu_invalidate_addr
    mmu = _indirect(env, "invlpg")
    flush = yield from kvm_mmu_invalidate_addr.steps(mmu, env.vcpu(a["vcpu"]), a["gva"])
    return Res("flush" if flush else "no-flush")


def op_cr3_load(env: Env, a: dict):
    from kvmsim.x86.paging_tmpl import kvm_mmu_sync_roots
    mmu = _indirect(env, "cr3_load")
    flush = yield from kvm_mmu_sync_roots.steps(mmu, env.vcpu(a["vcpu"]))
    return Res("flush" if flush else "no-flush")


def op_pre_fault_memory(env: Env, a: dict):
    from kvmsim.x86.prefault import KvmPreFaultMemory, kvm_vcpu_pre_fault_memory
    if not hasattr(env.kvm.arch, "tdp_enabled"):
        raise ModelError(errno.EINVAL, "pre_fault_memory is modelled for arch = \"x86\" only")
    rng = KvmPreFaultMemory(a["gpa"], a["size"], a["flags"])
    r = yield from kvm_vcpu_pre_fault_memory.steps(env.vcpu(a["vcpu"]), rng)
    if r < 0:
        return Res(errno_name(-r).lower(), -r, rng.size)
    return Res("ok", 0, rng.size)


X86_SHADOW_OPS = {"guest_pte_write": op_guest_pte_write, "invlpg": op_invlpg, "cr3_load": op_cr3_load,
                  "pre_fault_memory": op_pre_fault_memory}
