"""The XIVE native event-queue page (arch/powerpc/kvm/book3s_xive_native.c, Linux v6.12 and v6.13).

Mirrors the page handling of ``kvmppc_xive_native_set_queue_config()`` (``KVM_DEV_XIVE_GRP_EQ_CONFIG``)
and ``kvmppc_xive_native_cleanup_queue()``: the queue page comes from ``gfn_to_page(kvm, gfn)`` (NULL
→ -EINVAL, "Couldn't get queue page"), the hypervisor keeps it while the queue is configured, and
``put_page()`` drops it when the queue is reset.  The code is the same in both versions (patch 1 "KVM:
Drop KVM_ERR_PTR_BAD_PAGE and instead return NULL to indicate an error" only changed the NULL test);
what differs is ``gfn_to_page()`` itself: v6.12 returned a VM_PFNMAP / VM_IO page it had grabbed
with ``kvm_try_get_pfn()`` (INV-8), v6.13 returns NULL for remapped memory (patch 85 "KVM: Don't grab
reference on VM_MIXEDMAP pfns that have a "struct page""), so the queue cannot live there.

Not modelled: the queue size check against ``kvm_host_page_size()``, OPAL's
``xive_native_configure_queue()`` failing, the queue contents and ``mark_page_dirty()`` of the EQ page
on ``KVM_DEV_XIVE_EQ_SYNC``.
"""

from __future__ import annotations

import errno

from kvmsim.kvm.pfn import gfn_to_page
from kvmsim.ppc.book3s import put_gfn_to_page
from kvmsim.types import PAGE_SHIFT


def kvmppc_xive_native_set_queue_config(kvm, server: int, qaddr: int) -> int:
    """The queue page of ``server``'s event queue at guest address ``qaddr``: 0, or -EINVAL when
    ``gfn_to_page()`` finds no page.  A queue already configured is cleaned up first."""
    queues = kvm.arch.xive_queues
    if server in queues:
        kvmppc_xive_native_cleanup_queue(kvm, server)
    page = gfn_to_page(kvm, qaddr >> PAGE_SHIFT)
    if page is None:
        kvm.journal.count("kvmppc_xive_native_set_queue_config_no_page")
        return -errno.EINVAL
    queues[server] = page
    return 0


def kvmppc_xive_native_cleanup_queue(kvm, server: int) -> None:
    """``if (q->qpage) put_page(virt_to_page(q->qpage))``: the queue page's reference goes."""
    page = kvm.arch.xive_queues.pop(server, None)
    if page is None:
        return
    put_gfn_to_page(kvm, page, "kvmppc_xive_native_cleanup_queue")
