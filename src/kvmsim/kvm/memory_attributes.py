"""Per-gfn memory attributes and KVM_SET_MEMORY_ATTRIBUTES (virt/kvm/kvm_main.c, include/linux/kvm_host.h;
Linux v6.12 and v6.13, which the series does not touch).

``kvm->mem_attr_array`` is an xarray gfn → attributes; the model keeps a dict with only the gfns whose
attributes are non-zero (``xa_store()`` of NULL erases the entry).  The only attribute is
``KVM_MEMORY_ATTRIBUTE_PRIVATE``; x86 supports it on VMs with private memory
(``kvm_arch_has_private_mem()``: KVM_X86_SW_PROTECTED_VM, SEV-SNP, TDX).

Converting a range (``kvm_vm_set_mem_attributes()``) is an MMU invalidation without the mmu_notifier::

    CPU0 (vCPU private fault)                 | CPU1 (KVM_SET_MEMORY_ATTRIBUTES)
    mmu_seq = kvm->mmu_invalidate_seq         |
    is_private == kvm_mem_is_private() (ok)   |
    kvm_gmem_get_pfn()                        |
                                              | kvm_handle_gfn_range(pre): invalidate_begin,
                                              |   range_add, zap SPTEs (kvm_arch_pre_set_...)
                                              | xa_store() the new attributes
                                              | kvm_handle_gfn_range(post): mixed tracking,
                                              |   invalidate_end (seq++)
    mmu_lock; is_page_fault_stale() → RETRY   |

A vCPU's memory fault exit (``kvm_prepare_memory_fault_exit()``) is the ``kvm_run.memory_fault``
record userspace reads when KVM_RUN fails with -EFAULT and ``exit_reason == KVM_EXIT_MEMORY_FAULT``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from kvmsim.errors import ModelError
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE
from kvmsim.uapi import KVM_MEM, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_EXIT_FLAG_PRIVATE


@dataclass(frozen=True, slots=True)
class KvmMemoryFault:
    """``kvm_run.memory_fault`` of a KVM_EXIT_MEMORY_FAULT: ``gpa``, ``size`` and ``flags``
    (``KVM_MEMORY_EXIT_FLAG_PRIVATE`` when the faulting access was private)."""

    gpa: int
    size: int
    flags: int

    def as_dict(self) -> dict[str, int]:
        return {"gpa": self.gpa, "size": self.size, "flags": self.flags}


def kvm_prepare_memory_fault_exit(vcpu, gpa: int, size: int, is_write: bool, is_exec: bool,
                                  is_private: bool) -> None:
    """Mirrors ``kvm_prepare_memory_fault_exit()`` (include/linux/kvm_host.h): ``exit_reason =
    KVM_EXIT_MEMORY_FAULT``, gpa and size; the RWX flags are "not (yet) defined or communicated to
    userspace", so ``flags`` is ``KVM_MEMORY_EXIT_FLAG_PRIVATE`` or 0."""
    vcpu.memory_fault = KvmMemoryFault(gpa, size, KVM_MEMORY_EXIT_FLAG_PRIVATE if is_private else 0)
    vcpu.kvm.journal.count("memory_fault_exit")


def kvm_get_memory_attributes(kvm, gfn: int) -> int:
    """Mirrors ``kvm_get_memory_attributes()``: ``xa_to_value(xa_load(&kvm->mem_attr_array, gfn))``."""
    return kvm.mem_attr_array.get(gfn, 0)


def kvm_mem_is_private(kvm, gfn: int) -> bool:
    """Mirrors ``kvm_mem_is_private()`` (CONFIG_KVM_PRIVATE_MEM)."""
    return bool(kvm.mem_attr_array.get(gfn, 0) & KVM_MEMORY_ATTRIBUTE_PRIVATE)


def kvm_slot_can_be_private(slot) -> bool:
    """Mirrors ``kvm_slot_can_be_private()``: ``slot && (slot->flags & KVM_MEM_GUEST_MEMFD)``."""
    return slot is not None and bool(int(slot.flags) & KVM_MEM.GUEST_MEMFD)


def kvm_supported_mem_attributes(kvm) -> int:
    """Mirrors ``kvm_supported_mem_attributes()``: PRIVATE if ``kvm_arch_has_private_mem()``, else none.
    Only x86 has private memory in v6.12 / v6.13 (its MMU supplies the attribute hooks), and only with the
    TDP MMU: ``__kvm_is_vm_type_supported()`` offers KVM_X86_SW_PROTECTED_VM only if ``tdp_mmu_enabled``."""
    has = kvm.has_private_mem and getattr(kvm.arch, "pre_set_memory_attributes", None) is not None \
        and getattr(kvm.arch, "tdp_mmu_enabled", False)
    return KVM_MEMORY_ATTRIBUTE_PRIVATE if has else 0


def kvm_range_has_memory_attributes(kvm, start: int, end: int, mask: int, attrs: int) -> bool:
    """Mirrors ``kvm_range_has_memory_attributes()``: every gfn in ``[start, end)`` has ``attrs`` under
    ``mask`` (an empty range: true)."""
    arr = kvm.mem_attr_array
    if not attrs & mask and not arr:
        return True
    return all(arr.get(g, 0) & mask == attrs & mask for g in range(start, end))


def kvm_handle_gfn_range(kvm, start: int, end: int, on_lock, handler, flush_on_ret: bool) -> None:
    """Mirrors the attribute flavour of ``kvm_handle_gfn_range()``: for each memslot overlapping
    ``[start, end)`` call ``handler(slot, g0, g1)``; ``mmu_lock`` (for write) and ``on_lock()`` are
    taken at the first memslot found, so a range with no memslot touches neither; a TLB flush if
    ``flush_on_ret`` and a handler returned true."""
    found = False
    flush = False
    for slots in kvm.memslots:
        for slot in slots.overlapping(start, end):
            g0, g1 = max(start, slot.base_gfn), min(end, slot.base_gfn + slot.npages)
            if g0 >= g1:
                continue
            if not found:
                found = True
                kvm.mmu_lock.write_lock()
                if on_lock is not None:
                    on_lock()
            flush |= bool(handler(slot, g0, g1))
    if flush_on_ret and flush:
        kvm.flush_remote_tlbs("kvm_vm_set_mem_attributes")
    if found:
        kvm.mmu_lock.write_unlock()


def kvm_pre_set_memory_attributes(kvm, slot, start: int, end: int) -> bool:
    """Mirrors ``kvm_pre_set_memory_attributes()``: "Unconditionally add the range to the invalidation
    set", then ``kvm_arch_pre_set_memory_attributes()`` (x86: zap the range's SPTEs)."""
    kvm.mmu_invalidate_range_add(start, end)
    return kvm.arch.pre_set_memory_attributes(slot, start, end)


def kvm_vm_set_mem_attributes(kvm, start: int, end: int, attributes: int) -> None:
    """Mirrors ``kvm_vm_set_mem_attributes()``: nothing if the whole range already has ``attributes``;
    else the pre-set range (``kvm_mmu_invalidate_begin`` on lock, zap, flush), the stores, and the
    post-set range (``kvm_arch_post_set_memory_attributes()``, ``kvm_mmu_invalidate_end`` on lock)."""
    if kvm_range_has_memory_attributes(kvm, start, end, ~0, attributes):
        kvm.journal.count("set_memory_attributes_noop")
        return
    kvm_handle_gfn_range(kvm, start, end, kvm.mmu_invalidate_begin,
                         lambda slot, g0, g1: kvm_pre_set_memory_attributes(kvm, slot, g0, g1), True)
    arr = kvm.mem_attr_array
    for g in range(start, end):
        if attributes:
            arr[g] = attributes
        else:
            arr.pop(g, None)
    kvm_handle_gfn_range(kvm, start, end, kvm.mmu_invalidate_end,
                         lambda slot, g0, g1: kvm.arch.post_set_memory_attributes(slot, g0, g1, attributes),
                         False)
    kvm.journal.count("set_memory_attributes")


#: The largest range one KVM_SET_MEMORY_ATTRIBUTES may convert in the model (the kernel's bound is memory
#: for the xarray; the model walks gfns one by one).
MAX_ATTRIBUTE_PAGES = 1 << 20


def kvm_vm_ioctl_set_mem_attributes(kvm, address: int, size: int, attributes: int, flags: int = 0) -> None:
    """Mirrors ``kvm_vm_ioctl_set_mem_attributes()`` (KVM_SET_MEMORY_ATTRIBUTES): EINVAL for non-zero
    ``flags``, an unsupported attribute, a zero size or a wrapping range, an unaligned address or size;
    then :func:`kvm_vm_set_mem_attributes`.  Raises ``ModelError`` with the errno."""
    if kvm.destroyed:
        raise ModelError(errno.EBADF, "KVM_SET_MEMORY_ATTRIBUTES: the VM was destroyed (its fd is closed)")
    if flags:
        raise ModelError(errno.EINVAL, f"KVM_SET_MEMORY_ATTRIBUTES: flags {flags:#x} must be 0")
    if attributes & ~kvm_supported_mem_attributes(kvm):
        raise ModelError(errno.EINVAL, f"KVM_SET_MEMORY_ATTRIBUTES: attributes {attributes:#x} not supported "
                                       f"(supported {kvm_supported_mem_attributes(kvm):#x})")
    if size == 0 or address + size >= 1 << 64:
        raise ModelError(errno.EINVAL, f"KVM_SET_MEMORY_ATTRIBUTES: size {size:#x} is zero or the range wraps")
    if address % PAGE_SIZE or size % PAGE_SIZE:
        raise ModelError(errno.EINVAL, f"KVM_SET_MEMORY_ATTRIBUTES: address {address:#x} / size {size:#x} "
                                       "not page aligned")
    if size >> PAGE_SHIFT > MAX_ATTRIBUTE_PAGES:
        raise ModelError(errno.ENOMEM, f"KVM_SET_MEMORY_ATTRIBUTES: {size >> PAGE_SHIFT} pages exceed the "
                                       f"model's bound of {MAX_ATTRIBUTE_PAGES} (xa_reserve() failing)")
    start = address >> PAGE_SHIFT
    kvm_vm_set_mem_attributes(kvm, start, start + (size >> PAGE_SHIFT), attributes)
