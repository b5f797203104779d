"""arm64 MTE in KVM: ``KVM_CAP_ARM_MTE``, ``sanitise_mte_tags()`` and ``KVM_ARM_MTE_COPY_TAGS``
(arch/arm64/kvm/arm.c, arch/arm64/kvm/mmu.c, arch/arm64/kvm/guest.c; Linux v6.12 and v6.13).

The model keeps one allocation tag per page (``Arm64Mmu.mte_tags``, pfn -> tag; a pfn in it is
PG_mte_tagged).  A VMA is VM_MTE_ALLOWED as arm64's ``arch_calc_vm_flag_bits()`` makes it: a
MAP_ANONYMOUS mapping or a shmem file (memfd); a regular file, a driver's VM_PFNMAP / VM_MIXEDMAP
mapping and (on the v6.12 host) hugetlbfs are not.

``kvm_vm_ioctl_mte_copy_tags()`` is one loop in both versions; what differs is how it gets the page
of each gfn and how it lets it go, patch 77 "KVM: arm64: Use __gfn_to_page() when copying MTE tags
to/from userspace" (the resolved ``kvm.ops.mte_tag_page``):

* v6.12 (:class:`MteTagPageV612`): ``gfn_to_pfn_prot(kvm, gfn, write, NULL)``, then
  ``pfn_to_online_page(pfn)``.  A VM_PFNMAP / VM_IO pfn of online RAM passes: its tags are read or
  written, with a ``kvm_try_get_pfn()`` reference when the guess calls it refcounted and none when it
  is reserved; the release is ``kvm_release_pfn_clean/dirty(pfn)`` (a guess again).  ZONE_DEVICE is
  rejected with ``kvm_release_pfn_clean(pfn)``.
* v6.13 (:class:`MteTagPageV613`): ``__gfn_to_page(kvm, gfn, write)``, NULL for any remapped pfn
  (patch 85) -> -EFAULT; ZONE_DEVICE is released with ``kvm_release_page_unused()``; the release is
  ``kvm_release_page_clean/dirty(page)``.

Copying tags *to* the guest dirties the page (``kvm_release_{pfn,page}_dirty()``, SetPageDirty) in
both versions and never the memslot's dirty log: the ioctl is -EBUSY while any memslot logs.

Reachable only when the VMA behind an MTE memslot is replaced after the memslot was created (e.g.
mmap(MAP_FIXED) of a driver over it): ``kvm_arch_prepare_memory_region()`` refuses a VMA without
VM_MTE_ALLOWED.

Not modelled: tag granules (16 bytes of data per 4-bit tag: the model keeps one tag per page),
hugetlb folio tagging (``folio_test_hugetlb_mte_tagged()``, v6.13 with hugetlbfs MTE support), a
failed ``mte_copy_tags_from_user()`` (partial uaccess).
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.kvm.pfn import (Hold, KvmFollowPfn, gfn_to_page, is_error_noslot_pfn, kvm_follow_pfn, kvm_release_gfn_page,
                            kvm_release_page_unused, kvm_release_pfn)
from kvmsim.mm.gup import FOLL
from kvmsim.mm.vma import VmaKind
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE

#: ``struct kvm_arm_copy_mte_tags.flags`` (arch/arm64/include/uapi/asm/kvm.h).
KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1
INT_MAX = (1 << 31) - 1


def kvm_vma_mte_allowed(vma) -> bool:
    """Mirrors ``kvm_vma_mte_allowed()``: ``vma->vm_flags & VM_MTE_ALLOWED``, which arm64's
    ``arch_calc_vm_flag_bits()`` sets for MAP_ANONYMOUS and shmem files (module docstring)."""
    return vma.kind in (VmaKind.ANON, VmaKind.ANON_SHARED, VmaKind.MEMFD)


def kvm_vm_ioctl_enable_cap_mte(kvm) -> None:
    """``KVM_ENABLE_CAP(KVM_CAP_ARM_MTE)`` (``kvm_vm_ioctl_enable_cap()``, arch/arm64/kvm/arm.c): EINVAL
    on another arch or once a vCPU exists, else set KVM_ARCH_FLAG_MTE_ENABLED."""
    if getattr(kvm.arch, "family", None) != "arm64":
        raise ModelError(errno.EINVAL, "KVM_CAP_ARM_MTE: not an arm64 VM")
    if kvm.vcpus:
        raise ModelError(errno.EINVAL, "KVM_CAP_ARM_MTE: vCPUs already created")
    kvm.arch.mte_enabled = True


def sanitise_mte_tags(kvm, pfn: int, size: int) -> None:
    """Mirrors ``sanitise_mte_tags()`` (arch/arm64/kvm/mmu.c, v6.12 and v6.13): before a new mapping of
    ``size``, each page not yet PG_mte_tagged gets its tags cleared and becomes tagged."""
    tags = kvm.arch.mte_tags
    for p in range(pfn, pfn + (size >> PAGE_SHIFT)):
        if p not in tags:
            tags[p] = 0
            kvm.journal.count("mte_clear_page_tags")


def pfn_to_online_page(phys, pfn: int) -> int | None:
    """``pfn_to_online_page()``: the page of an online memory section: RAM with a struct page, not
    ZONE_DEVICE and not MMIO."""
    if not phys.pfn_valid(pfn) or phys.is_zone_device(pfn):
        return None
    return pfn


class MteTagPageV612:
    """v6.12 ``kvm_vm_ioctl_mte_copy_tags()``'s page of one gfn (module docstring), until patch 77 "KVM:
    arm64: Use __gfn_to_page() when copying MTE tags to/from userspace"."""

    @staticmethod
    def get(kvm, gfn: int, write: bool) -> tuple[int | None, object]:
        """``pfn = gfn_to_pfn_prot(kvm, gfn, write, NULL)``; error -> -EFAULT; ``page =
        pfn_to_online_page(pfn)``, NULL ("Reject ZONE_DEVICE memory") -> ``kvm_release_pfn_clean(pfn)``
        and -EFAULT.  Returns (page, what :meth:`put` releases)."""
        kfp = KvmFollowPfn(kvm.gfn_to_memslot(gfn), gfn, flags=FOLL.WRITE if write else FOLL(0),
                           caller="gfn_to_pfn_prot")
        pfn = kvm_follow_pfn(kvm, kfp)
        if is_error_noslot_pfn(pfn):
            return None, None
        page = pfn_to_online_page(kvm.phys, pfn)
        if page is None:
            kvm_release_pfn(kvm, pfn, False, "kvm_release_pfn_clean", gfn=gfn)
            return None, None
        return page, pfn

    @staticmethod
    def put(kvm, pfn: int, dirty: bool, gfn: int) -> None:
        """``kvm_release_pfn_dirty(pfn)`` after writing tags, ``kvm_release_pfn_clean(pfn)`` after reading."""
        kvm_release_pfn(kvm, pfn, dirty, "kvm_release_pfn_dirty" if dirty else "kvm_release_pfn_clean", gfn=gfn)


class MteTagPageV613:
    """v6.13 ``kvm_vm_ioctl_mte_copy_tags()``'s page of one gfn: patch 77 "KVM: arm64: Use
    __gfn_to_page() when copying MTE tags to/from userspace"."""

    @staticmethod
    def get(kvm, gfn: int, write: bool) -> tuple[int | None, object]:
        """``page = __gfn_to_page(kvm, gfn, write)``, NULL -> -EFAULT; a page that is not online
        (ZONE_DEVICE) -> ``kvm_release_page_unused(page)`` and -EFAULT."""
        page = gfn_to_page(kvm, gfn, write)
        if page is None:
            return None, None
        if pfn_to_online_page(kvm.phys, page) is None:
            n = kvm.page_refs_out.get(page, 0)
            if n <= 1:
                kvm.page_refs_out.pop(page, None)
            else:
                kvm.page_refs_out[page] = n - 1
            kvm_release_page_unused(kvm, page, Hold.GET, "kvm_release_page_unused")
            return None, None
        return page, page

    @staticmethod
    def put(kvm, page: int, dirty: bool, gfn: int) -> None:
        """``kvm_release_page_dirty(page)`` after writing tags, ``kvm_release_page_clean(page)`` after reading."""
        kvm_release_gfn_page(kvm, page, dirty)


def kvm_vm_ioctl_mte_copy_tags(kvm, guest_ipa: int, length: int, flags: int, tag: int = 0) -> tuple[int, list]:
    """Mirrors ``kvm_vm_ioctl_mte_copy_tags()`` (arch/arm64/kvm/guest.c, v6.12 and v6.13; the page of
    each gfn is ``kvm.ops.mte_tag_page``, module docstring).

    To the guest (``flags`` 0) every page's tags become ``tag``; from the guest (KVM_ARM_TAGS_FROM_GUEST)
    the tags are read (0 for a page that is not PG_mte_tagged).  Returns (bytes of guest memory
    covered, tags read); the kernel returns the bytes done when it stopped part way.  Raises
    ModelError EINVAL (no MTE, bad flags, unaligned or too long), EBUSY (writing tags while a memslot
    logs dirty pages), EFAULT (the first page has no usable page)."""
    if not getattr(kvm.arch, "mte_enabled", False):
        raise ModelError(errno.EINVAL, "KVM_ARM_MTE_COPY_TAGS: MTE is not enabled on this VM (KVM_CAP_ARM_MTE)")
    if flags & ~KVM_ARM_TAGS_FROM_GUEST:
        raise ModelError(errno.EINVAL, f"KVM_ARM_MTE_COPY_TAGS: unknown flags {flags:#x}")
    if length & (PAGE_SIZE - 1) or guest_ipa & (PAGE_SIZE - 1):
        raise ModelError(errno.EINVAL, "KVM_ARM_MTE_COPY_TAGS: guest_ipa and length must be page aligned")
    if length > INT_MAX:
        raise ModelError(errno.EINVAL, "KVM_ARM_MTE_COPY_TAGS: length above INT_MAX")
    write = not flags & KVM_ARM_TAGS_FROM_GUEST
    if write and any(s.dirty_bitmap is not None for slots in kvm.memslots for s in slots):
        raise ModelError(errno.EBUSY, "KVM_ARM_MTE_COPY_TAGS: a memslot logs dirty pages "
                                      "(kvm->nr_memslots_dirty_logging)")
    ops = kvm.ops.mte_tag_page
    tags = kvm.arch.mte_tags
    gfn = guest_ipa >> PAGE_SHIFT
    left, out, ret = length, [], 0
    kvm.journal.count("kvm_vm_ioctl_mte_copy_tags")
    while left > 0:
        page, token = ops.get(kvm, gfn, write)
        if page is None:
            ret = -errno.EFAULT
            break
        if write:
            tags[page] = tag                           # try_page_mte_tagging(); copy; set_page_mte_tagged()
            kvm.journal.count("mte_copy_tags_from_user")
        else:
            out.append(tags.get(page, 0))              # mte_copy_tags_to_user(), or clear_user() if untagged
            kvm.journal.count("mte_copy_tags_to_user")
        ops.put(kvm, token, write, gfn)
        gfn += 1
        left -= PAGE_SIZE
    if left != length:
        return length - left, out
    if ret:
        raise ModelError(-ret, f"KVM_ARM_MTE_COPY_TAGS: gfn {gfn:#x} has no page to copy tags "
                               f"{'to' if write else 'from'}")
    return 0, out


__all__ = ["KVM_ARM_TAGS_FROM_GUEST", "KVM_ARM_TAGS_TO_GUEST", "MteTagPageV612", "MteTagPageV613",
           "kvm_vm_ioctl_enable_cap_mte", "kvm_vm_ioctl_mte_copy_tags", "kvm_vma_mte_allowed", "sanitise_mte_tags"]
