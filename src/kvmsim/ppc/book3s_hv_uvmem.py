"""Secure-guest pages shared with or sent to the Ultravisor (arch/powerpc/kvm/book3s_hv_uvmem.c, Linux
v6.12 and v6.13).

Mirrors ``kvmppc_share_page()`` (``H_SVM_PAGE_IN`` with ``H_PAGE_IN_SHARED``) and
``kvmppc_send_page_to_uv()`` (a secure guest's radix page fault).  Both hand ``uv_page_in()`` the
host page that backs the gfn.  v6.12 found it with ``gfn_to_pfn(kvm, gfn)``, which accepts any pfn:
a VM_PFNMAP pfn with no struct page went to the Ultravisor as is, and ``kvm_release_pfn_clean()``
released whatever the pfn guess found.  Patch 78 "KVM: PPC: Explicitly require struct page memory for
Ultravisor sharing" made both use ``gfn_to_page()``, NULL for remapped memory, so sharing fails with
``H_PARAMETER`` and the page-in with ``-EFAULT``; the page is released with
``kvm_release_page_clean()`` (``kvm_release_page_unused()`` on the retry path).

The device-private uvmem pfns (``kvmppc_gfn_is_uvmem_pfn()``) are not modelled, so neither is the
retry when a gfn became one between the lookup and ``uvmem_lock`` (the path patch 78 made put-only).
"""

from __future__ import annotations

import errno
from typing import Callable

from kvmsim.kvm.pfn import (KvmFollowPfn, gfn_to_page, is_error_noslot_pfn, kvm_follow_pfn, kvm_release_gfn_page,
                            kvm_release_pfn)
from kvmsim.mm.gup import FOLL
from kvmsim.types import PAGE_SHIFT

#: arch/powerpc/include/asm/hvcall.h and ultravisor-api.h
H_SUCCESS = 0
H_PARAMETER = -4
U_SUCCESS = 0


def _no_release(unused: bool) -> None:
    """Nothing to release (the lookup failed)."""


def gfn_to_pfn_v612(kvm, gfn: int) -> tuple[int | None, Callable]:
    """v6.12 ``pfn = gfn_to_pfn(kvm, gfn)`` (resolved for write, any pfn) and its
    ``kvm_release_pfn_clean(pfn)`` on every path; replaced by patch 78 "KVM: PPC: Explicitly require
    struct page memory for Ultravisor sharing"."""
    kfp = KvmFollowPfn(kvm.gfn_to_memslot(gfn), gfn, flags=FOLL.WRITE, caller="gfn_to_pfn")
    pfn = kvm_follow_pfn(kvm, kfp)
    if is_error_noslot_pfn(pfn):
        return None, _no_release

    def release(unused: bool) -> None:
        kvm_release_pfn(kvm, pfn, False, "kvm_release_pfn_clean", unused=unused, gfn=gfn)
    return pfn, release


def gfn_to_page_v613(kvm, gfn: int) -> tuple[int | None, Callable]:
    """v6.13 ``page = gfn_to_page(kvm, gfn)`` (NULL for memory without a refcounted struct page) and
    ``kvm_release_page_clean(page)`` (patch 78 "KVM: PPC: Explicitly require struct page memory for
    Ultravisor sharing")."""
    page = gfn_to_page(kvm, gfn)
    if page is None:
        return None, _no_release

    def release(unused: bool) -> None:
        kvm_release_gfn_page(kvm, page)
    return page, release


def uv_page_in(kvm, pfn: int, gfn: int) -> int:
    """``uv_page_in(lpid, pfn << PAGE_SHIFT, gpa, 0, page_shift)``: the Ultravisor copies the page in
    (counted, and whether the pfn has a struct page; the model's Ultravisor accepts any pfn)."""
    kvm.journal.count("uv_page_in")
    if not kvm.phys.pfn_valid(pfn):
        kvm.journal.count("uv_page_in_no_struct_page")
    return U_SUCCESS


def kvmppc_share_page(kvm, gpa: int) -> int:
    """Mirrors ``kvmppc_share_page()``: look the page up (per version, ``kvm.ops.arch_ops``), page it in
    to the Ultravisor, mark the gfn shared; ``H_SUCCESS``, or ``H_PARAMETER`` when the lookup fails."""
    gfn = gpa >> PAGE_SHIFT
    pfn, release = kvm.ops.arch_ops.uv_gfn_to_pfn(kvm, gfn)
    if pfn is None:
        return H_PARAMETER
    ret = H_PARAMETER
    if uv_page_in(kvm, pfn, gfn) == U_SUCCESS:
        kvm.journal.count("kvmppc_gfn_shared")
        ret = H_SUCCESS
    release(False)
    return ret


def kvmppc_send_page_to_uv(kvm, gfn: int) -> int:
    """Mirrors ``kvmppc_send_page_to_uv()``: RESUME_GUEST (0) once ``uv_page_in()`` succeeded, -EFAULT
    when the lookup (or the Ultravisor) failed."""
    pfn, release = kvm.ops.arch_ops.uv_gfn_to_pfn(kvm, gfn)
    if pfn is None:
        return -errno.EFAULT
    ret = uv_page_in(kvm, pfn, gfn)
    release(False)
    return 0 if ret == U_SUCCESS else -errno.EFAULT
