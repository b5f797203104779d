"""Linux <= v5.12: the remapped path took ``get_page()`` on any non-reserved pfn (CVE-2021-22543).

On a non-refcounted page (``_refcount`` 0) that makes 0→1, and KVM's later put frees the page to
the buddy allocator while its owner still uses it.  Fixed by f8be156be163 "KVM: do not allow
mapping valid but non-reference-counted pages" (v5.13), which became legacy's EFAULT.
"""

from __future__ import annotations

from kvmsim.kvm.pfn import Hold, kvm_pfn_to_refcounted_page
from kvmsim.policies.legacy import LegacyPolicy
from kvmsim.trace import Src


class Pre513Policy(LegacyPolicy):
    name = "pre-5.13"
    title = "v5.12: get_page() on any remapped pfn with a struct page"

    def remapped_get_ref(self, kvm, pfn, caller):
        """``kvm_get_pfn()`` on the remapped pfn before f8be156be163: no zero check."""
        page = kvm_pfn_to_refcounted_page(kvm.phys, pfn)
        if page is None:
            return True, Hold.NONE
        kvm.phys.get_page(page, caller, kvm=True, source=Src.REMAPPED)
        return True, Hold.GET
