"""Scenario ops of the PowerPC Book3S profiles (:mod:`kvmsim.ppc`): dcbz patching, Ultravisor page-in,
the PR magic page, a guest PTE's write permission, an HPTE cache that runs out, the XIVE queue page.

Merged into :data:`kvmsim.scenarios.ops.OP_ARGS` / ``OPS`` with one line each.
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.scenarios.env import Env, Res, _done
from kvmsim.scenarios.loader import MAX_COUNT, REQUIRED, c_bool, c_bounded, c_int, c_size
from kvmsim.types import PAGE_SHIFT

PPC_BOOK3S_OP_ARGS = {
    "dcbz_patch": {"gpa": (c_size, REQUIRED), "vcpu": (c_int, 0)},
    "uv_share": {"gpa": (c_size, REQUIRED)},
    "uv_page_in": {"gpa": (c_size, REQUIRED)},
    "ppc_magic_page": {"gpa": (c_size, REQUIRED), "vcpu": (c_int, 0)},
    "ppc_guest_pte": {"gpa": (c_size, REQUIRED), "may_write": (c_bool, True)},
    "hpte_cache_fail": {"count": (c_bounded(c_int, 1, MAX_COUNT, "a count"), 1)},
    "xive_queue_config": {"gpa": (c_size, REQUIRED), "server": (c_int, 0)},
    "xive_queue_reset": {"server": (c_int, 0)},
}


def _arch(env: Env, op: str, *families: str):
    """The VM's MMU if it is one of ``families``, else EINVAL naming what the op needs."""
    arch = env.kvm.arch
    if arch.family not in families:
        raise ModelError(errno.EINVAL, f"{op} needs arch = {' or '.join(repr(f) for f in families)}, "
                                       f"not {arch.family!r}")
    return arch


def op_dcbz_patch(env: Env, a: dict):
    """``kvmppc_patch_dcbz()`` of the page at ``gpa`` (what a Book3S PR instruction fault does for a
    guest whose dcbz is 32 bytes): v6.12 or v6.13 as the policy resolved it."""
    _arch(env, "dcbz_patch", "ppc-book3s-pr")
    env.kvm.ops.arch_ops.kvmppc_patch_dcbz(env.vcpu(a["vcpu"]), a["gpa"])
    yield from _done("kvmppc_patch_dcbz done")
    return Res("ok")


def op_uv_share(env: Env, a: dict):
    """``H_SVM_PAGE_IN`` with ``H_PAGE_IN_SHARED``: ``kvmppc_share_page()``; ``h_success`` or ``h_parameter``."""
    from kvmsim.ppc.book3s_hv_uvmem import H_SUCCESS, kvmppc_share_page
    _arch(env, "uv_share", "ppc-book3s-radix")
    ret = kvmppc_share_page(env.kvm, a["gpa"])
    yield from _done("kvmppc_share_page done")
    return Res("h_success" if ret == H_SUCCESS else "h_parameter", value=ret)


def op_uv_page_in(env: Env, a: dict):
    """A secure guest's page fault: ``kvmppc_send_page_to_uv()``; ``resume_guest`` or ``efault``."""
    from kvmsim.ppc.book3s_hv_uvmem import kvmppc_send_page_to_uv
    _arch(env, "uv_page_in", "ppc-book3s-radix")
    ret = kvmppc_send_page_to_uv(env.kvm, a["gpa"] >> PAGE_SHIFT)
    yield from _done("kvmppc_send_page_to_uv done")
    return Res("resume_guest") if ret == 0 else Res("efault", -ret)


def op_ppc_magic_page(env: Env, a: dict):
    """The guest's ``KVM_HC_PPC_MAP_MAGIC_PAGE`` hypercall (Book3S PR): the vCPU's shared page at ``gpa``."""
    mmu = _arch(env, "ppc_magic_page", "ppc-book3s-pr")
    pfn = mmu.kvmppc_map_magic_page(env.vcpu(a["vcpu"]), a["gpa"])
    yield from _done("KVM_HC_PPC_MAP_MAGIC_PAGE done")
    return Res("ok", value=pfn)


def op_ppc_guest_pte(env: Env, a: dict):
    """The guest (Book3S PR) sets its own PTE for ``gpa`` read-only or writable (``orig_pte->may_write``)."""
    mmu = _arch(env, "ppc_guest_pte", "ppc-book3s-pr")
    gfn = a["gpa"] >> PAGE_SHIFT
    (mmu.guest_pte_ro.discard if a["may_write"] else mmu.guest_pte_ro.add)(gfn)
    yield from _done("guest PTE set")
    return Res("ok")


def op_hpte_cache_fail(env: Env, a: dict):
    """Fault injection: the next ``count`` ``kmem_cache_zalloc(hpte_cache)`` calls return NULL, so
    ``kvmppc_mmu_hpte_cache_next()`` does and ``kvmppc_mmu_map_page()`` returns -EAGAIN (Book3S PR)."""
    mmu = _arch(env, "hpte_cache_fail", "ppc-book3s-pr")
    mmu.hpte_cache_alloc_failures += a["count"]
    yield from _done("hpte cache allocation failures armed")
    return Res("ok")


def op_xive_queue_config(env: Env, a: dict):
    """``KVM_DEV_XIVE_GRP_EQ_CONFIG``: ``kvmppc_xive_native_set_queue_config()`` with the queue page at ``gpa``."""
    from kvmsim.ppc.book3s_xive_native import kvmppc_xive_native_set_queue_config
    _arch(env, "xive_queue_config", "ppc-book3s-hv", "ppc-book3s-radix")
    ret = kvmppc_xive_native_set_queue_config(env.kvm, a["server"], a["gpa"])
    yield from _done("kvmppc_xive_native_set_queue_config done")
    return Res("ok") if ret == 0 else Res("einval", -ret)


def op_xive_queue_reset(env: Env, a: dict):
    """The queue reset (``kvmppc_xive_native_cleanup_queue()``): the queue page is put."""
    from kvmsim.ppc.book3s_xive_native import kvmppc_xive_native_cleanup_queue
    _arch(env, "xive_queue_reset", "ppc-book3s-hv", "ppc-book3s-radix")
    kvmppc_xive_native_cleanup_queue(env.kvm, a["server"])
    yield from _done("kvmppc_xive_native_cleanup_queue done")
    return Res("ok")


PPC_BOOK3S_OPS = {"dcbz_patch": op_dcbz_patch, "uv_share": op_uv_share, "uv_page_in": op_uv_page_in,
                  "ppc_magic_page": op_ppc_magic_page, "ppc_guest_pte": op_ppc_guest_pte,
                  "hpte_cache_fail": op_hpte_cache_fail, "xive_queue_config": op_xive_queue_config,
                  "xive_queue_reset": op_xive_queue_reset}
