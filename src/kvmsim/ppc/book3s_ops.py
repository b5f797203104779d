"""The Book3S profiles' per-policy callables, one :class:`kvmsim.ppc.book3s.Book3sOps` per kernel version
(``Policy.arch_ops()`` picks one when a VM is created; each callable's docstring cites its patch)."""

from __future__ import annotations

from kvmsim.ppc.book3s import Book3sOps, kvmppc_faultin_page_to_put, kvmppc_v612_page_to_put
from kvmsim.ppc.book3s_hv_uvmem import gfn_to_page_v613, gfn_to_pfn_v612
from kvmsim.ppc.book3s_pr import kvmppc_patch_dcbz, kvmppc_patch_dcbz_v612

#: Linux v6.12: HV / Radix's PageReserved rule, dcbz via gfn_to_page() + get_page(), uvmem via gfn_to_pfn().
BOOK3S_V612 = Book3sOps(page_to_put=kvmppc_v612_page_to_put, kvmppc_patch_dcbz=kvmppc_patch_dcbz_v612,
                        uv_gfn_to_pfn=gfn_to_pfn_v612)
#: Linux v6.13: the refcounted page, dcbz via kvm_vcpu_map(), uvmem via gfn_to_page().
BOOK3S_V613 = Book3sOps(page_to_put=kvmppc_faultin_page_to_put, kvmppc_patch_dcbz=kvmppc_patch_dcbz,
                        uv_gfn_to_pfn=gfn_to_page_v613)

#: The arch names (``Kvm(arch=...)``, the MMU's ``family``) these ops serve.
BOOK3S_ARCHES = ("ppc-book3s-hv", "ppc-book3s-radix", "ppc-book3s-pr")
