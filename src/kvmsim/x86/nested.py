"""Nested VMX and SVM: L1's structures that KVM maps with ``kvm_vcpu_map()`` while L2 runs
(arch/x86/kvm/vmx/nested.c ``nested_get_vmcs12_pages()``, ``nested_put_vmcs12_pages()``,
``nested_vmx_prepare_msr_bitmap()``, ``nested_vmx_handle_enlightened_vmptrld()`` /
``nested_release_evmcs()``; arch/x86/kvm/svm/nested.c ``nested_svm_vmrun()``, ``nested_svm_vmexit()``).

The maps are :class:`kvmsim.kvm.host_map.KvmHostMap` (FOLL_GET in v6.12, FOLL_PIN in v6.13: patch 31
"KVM: Pin (as in FOLL_PIN) pages during kvm_vcpu_map()").  What differs here, through ``kvm.ops`` and
the existing ``vcpu_map_*`` hooks:

* the L1 APIC-access page: v6.12 ``nested_put_vmcs12_pages()`` unmapped it with ``dirty=false`` (the gfn
  never reaches KVM_GET_DIRTY_LOG, the folio is not dirtied); v6.13 marks it dirty like every writable
  map (patch 32 "KVM: nVMX: Mark vmcs12's APIC access page dirty when unmapping", then patch 33 "KVM:
  Pass in write/dirty to kvm_vcpu_map(), not kvm_vcpu_unmap()");
* the MSR bitmap: v6.12 ``kvm_vcpu_map()`` resolved it for write, so an MSR bitmap in a read-only memslot
  could not be mapped and L2 ran with every MSR access intercepted (``CPU_BASED_USE_MSR_BITMAPS``
  cleared in vmcs02); v6.13 maps it with ``kvm_vcpu_map_readonly()`` (patch 34 "KVM: Get writable
  mapping for __kvm_vcpu_map() only when necessary").  Both unmap it clean.

Refactors modelled as their v6.13 shape (no behaviour of their own): patch 21 "KVM: Explicitly initialize
all fields at the start of kvm_vcpu_map()" (a failed map leaves no map to unmap), patch 23 "KVM: nVMX:
Rely on kvm_vcpu_unmap() to track validity of eVMCS mapping", patch 24 "KVM: nVMX: Drop pointless
msr_bitmap_map field from struct nested_vmx" (the MSR bitmap map is a local), patch 25 "KVM: nVMX: Add
helper to put (unmap) vmcs12 pages".
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from kvmsim.errors import ModelError
from kvmsim.kvm.host_map import KvmHostMap, kvm_vcpu_map, kvm_vcpu_map_access, kvm_vcpu_unmap
from kvmsim.types import PAGE_SHIFT
from kvmsim.x86.vmx import KvmReq, _need_x86, kvm_make_request, to_vmx

#: arch/x86/include/asm/kvm_host.h: the value vmcs02's VIRTUAL_APIC_PAGE_ADDR gets to make VM-Entry fail.
INVALID_GPA = -1


@dataclass
class Vmcs12:
    """The ``struct vmcs12`` fields ``nested_get_vmcs12_pages()`` reads.  An address of None means the
    control that uses it is off (SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES, CPU_BASED_TPR_SHADOW,
    PIN_BASED_POSTED_INTR, CPU_BASED_USE_MSR_BITMAPS)."""

    apic_access_addr: int | None = None
    virtual_apic_page_addr: int | None = None
    posted_intr_desc_addr: int | None = None
    msr_bitmap: int | None = None


@dataclass
class NestedVmx:
    """Model of ``struct nested_vmx`` (the maps) and the vmcs02 fields they feed."""

    vmcs12: Vmcs12 = field(default_factory=Vmcs12)
    apic_access_page_map: KvmHostMap | None = None
    virtual_apic_map: KvmHostMap | None = None
    pi_desc_map: KvmHostMap | None = None
    hv_evmcs_map: KvmHostMap | None = None
    pi_desc: bool = False
    #: vmcs02: APIC_ACCESS_ADDR and VIRTUAL_APIC_PAGE_ADDR (pfns, INVALID_GPA), posted interrupts on,
    #: CPU_BASED_USE_MSR_BITMAPS on.
    apic_access_addr02: int | None = None
    virtual_apic_page_addr02: int | None = None
    posted_intr02: bool = False
    use_msr_bitmaps02: bool = False


@dataclass
class NestedEntry:
    """What a nested VM-Entry (VMLAUNCH/VMRESUME, VMRUN) did.

    ``result``: ``entered``; ``internal_error`` (KVM_EXIT_INTERNAL_ERROR: no backing for the vmcs12
    APIC-access address); ``vmentry_failed`` (vmcs02's VIRTUAL_APIC_PAGE_ADDR is INVALID_GPA);
    ``evmptrld_error``; SVM ``gp`` (#GP injected: ``kvm_vcpu_map()`` -EINVAL) or ``skipped``."""

    result: str
    msr_bitmap: str = "none"          # "merged" (L1's bitmap is used), "intercept_all", "none" (not in use)
    posted_intr: bool = False
    errno: int = 0

    def summary(self) -> str:
        return f"msr_bitmap={self.msr_bitmap} posted_intr={'on' if self.posted_intr else 'off'}"


def _map(vcpu, gpa: int, writable: bool = True) -> tuple[KvmHostMap | None, int]:
    """``kvm_vcpu_map()`` / ``kvm_vcpu_map_readonly()``: the map, or None and the errno (patch 21: a
    failed map leaves nothing behind)."""
    try:
        return kvm_vcpu_map(vcpu, gpa >> PAGE_SHIFT, writable), 0
    except ModelError as e:
        vcpu.kvm.journal.count("nested_map_failed")
        return None, e.errno


def to_nested(vcpu) -> NestedVmx:
    vmx = to_vmx(vcpu)
    if vmx.nested is None:
        vmx.nested = NestedVmx()
    return vmx.nested


def nested_vmx_prepare_msr_bitmap(vcpu, vmcs12: Vmcs12) -> bool:
    """Mirrors ``nested_vmx_prepare_msr_bitmap()``: map L1's MSR bitmap read-only (v6.13
    ``kvm_vcpu_map_readonly()``; v6.12 ``kvm_vcpu_map()``, for write: the ``vcpu_map_write`` hook), merge
    it into vmcs02's, unmap it clean.  False: "intercept every MSR"."""
    if vmcs12.msr_bitmap is None:
        return False
    m, _ = _map(vcpu, vmcs12.msr_bitmap, writable=False)
    if m is None:
        return False
    kvm_vcpu_map_access(m, write=False)                 # the merge reads L1's bitmap
    kvm_vcpu_unmap(vcpu, m, False)                      # v6.12: kvm_vcpu_unmap(vcpu, &msr_bitmap_map, false)
    return True


def nested_get_vmcs12_pages(vcpu) -> NestedEntry | None:
    """Mirrors ``nested_get_vmcs12_pages()``: map the APIC-access, virtual-APIC and PI-descriptor pages
    (writable) and prepare the MSR bitmap.  Returns a failed :class:`NestedEntry`, or None on success."""
    n = to_nested(vcpu)
    v = n.vmcs12
    # prepare_vmcs02() writes these controls afresh for every entry
    n.apic_access_addr02 = n.virtual_apic_page_addr02 = None
    n.posted_intr02 = n.use_msr_bitmaps02 = False
    if v.apic_access_addr is not None:
        n.apic_access_page_map, e = _map(vcpu, v.apic_access_addr)
        if n.apic_access_page_map is None:
            # pr_debug_ratelimited("no backing for APIC-access address in vmcs12"); KVM_EXIT_INTERNAL_ERROR
            return NestedEntry("internal_error", errno=e)
        n.apic_access_addr02 = n.apic_access_page_map.pfn
    if v.virtual_apic_page_addr is not None:
        n.virtual_apic_map, _ = _map(vcpu, v.virtual_apic_page_addr)
        n.virtual_apic_page_addr02 = n.virtual_apic_map.pfn if n.virtual_apic_map else INVALID_GPA
    if v.posted_intr_desc_addr is not None:
        n.pi_desc_map, _ = _map(vcpu, v.posted_intr_desc_addr)
        # a failed map defers the internal error until KVM touches the descriptor; posted interrupts off
        n.pi_desc = n.posted_intr02 = n.pi_desc_map is not None
    n.use_msr_bitmaps02 = nested_vmx_prepare_msr_bitmap(vcpu, v)
    return None


def nested_put_vmcs12_pages(vcpu) -> None:
    """Mirrors ``nested_put_vmcs12_pages()`` (patch 25 "KVM: nVMX: Add helper to put (unmap) vmcs12
    pages"): the APIC-access page with ``kvm.ops.arch_ops.nested_apic_access_unmap_dirty`` (v6.12 false, patch 32
    "KVM: nVMX: Mark vmcs12's APIC access page dirty when unmapping"), the virtual-APIC page and the PI
    descriptor dirty.  v6.13's ``kvm_vcpu_unmap()`` takes no ``dirty``: ``map->writable`` decides (patch 33)."""
    n = to_nested(vcpu)
    for attr, dirty in (("apic_access_page_map", vcpu.kvm.ops.arch_ops.nested_apic_access_unmap_dirty),
                        ("virtual_apic_map", True), ("pi_desc_map", True)):
        m = getattr(n, attr)
        if m is not None:
            kvm_vcpu_unmap(vcpu, m, dirty)
            setattr(n, attr, None)
    n.pi_desc = False


def nested_vmx_handle_enlightened_vmptrld(vcpu, evmcs_gpa: int) -> bool:
    """Hyper-V eVMCS: ``kvm_vcpu_map(vcpu, gpa_to_gfn(evmcs_gpa), &vmx->nested.hv_evmcs_map)``; a new
    address releases the old map first (``nested_release_evmcs()``).  False: EVMPTRLD_ERROR."""
    n = to_nested(vcpu)
    if n.hv_evmcs_map is not None and n.hv_evmcs_map.gfn == evmcs_gpa >> PAGE_SHIFT:
        return True
    nested_release_evmcs(vcpu)
    n.hv_evmcs_map, _ = _map(vcpu, evmcs_gpa)
    return n.hv_evmcs_map is not None


def nested_release_evmcs(vcpu) -> None:
    """Mirrors ``nested_release_evmcs()``: ``kvm_vcpu_unmap(vcpu, &vmx->nested.hv_evmcs_map, true)``;
    a map that never succeeded unmaps to nothing (patch 23 "KVM: nVMX: Rely on kvm_vcpu_unmap() to track
    validity of eVMCS mapping")."""
    n = to_nested(vcpu)
    if n.hv_evmcs_map is not None:
        kvm_vcpu_unmap(vcpu, n.hv_evmcs_map, True)
        n.hv_evmcs_map = None


def nested_vmx_enter_non_root_mode(vcpu, vmcs12: Vmcs12, evmcs: int | None = None) -> NestedEntry:
    """VMLAUNCH/VMRESUME from L1 (``nested_vmx_run()`` → ``nested_vmx_enter_non_root_mode()``)."""
    _need_x86(vcpu.kvm, "nested VMX")
    vmx = to_vmx(vcpu)
    if vmx.guest_mode:
        raise ModelError(errno.EINVAL, "nested_vmenter: the vCPU already runs L2 (nested_vmexit first)")
    n = to_nested(vcpu)
    if evmcs is not None and not nested_vmx_handle_enlightened_vmptrld(vcpu, evmcs):
        return NestedEntry("evmptrld_error")
    n.vmcs12 = vmcs12
    failed = nested_get_vmcs12_pages(vcpu)
    if failed is not None:
        nested_put_vmcs12_pages(vcpu)
        return failed
    msr = "none" if vmcs12.msr_bitmap is None else "merged" if n.use_msr_bitmaps02 else "intercept_all"
    if n.virtual_apic_page_addr02 == INVALID_GPA:
        nested_put_vmcs12_pages(vcpu)
        return NestedEntry("vmentry_failed", msr, n.posted_intr02)
    vmx.guest_mode = True
    vcpu.kvm.journal.count("nested_vmenter")
    return NestedEntry("entered", msr, n.posted_intr02)


def nested_vmx_vmexit(vcpu, *, free: bool = False) -> None:
    """``nested_vmx_vmexit()``: back to vmcs01, put the vmcs12 pages, and run a deferred APIC-access
    reload (``reload_vmcs01_apic_access_page`` → KVM_REQ_APIC_PAGE_RELOAD).  ``free``: then VMXOFF
    (``free_nested()``), which also releases the eVMCS."""
    vmx = to_vmx(vcpu)
    if not vmx.guest_mode and not free:
        raise ModelError(errno.EINVAL, "nested_vmexit: the vCPU does not run L2 (nested_vmenter first)")
    vmx.guest_mode = False
    nested_put_vmcs12_pages(vcpu)
    if vmx.reload_vmcs01_apic_access_page:
        vmx.reload_vmcs01_apic_access_page = False
        kvm_make_request(KvmReq.KVM_REQ_APIC_PAGE_RELOAD, vcpu)
    if free:
        nested_release_evmcs(vcpu)
    vcpu.kvm.journal.count("nested_vmexit")


def vmx_deliver_nested_posted_interrupt(vcpu, vector: int) -> bool:
    """``vmx_deliver_nested_posted_interrupt()``: while L2 runs with posted interrupts, KVM sets the
    vector in L1's PI descriptor through ``vmx->nested.pi_desc`` (the kernel mapping of the
    ``pi_desc_map``).  False: not posted (no descriptor; the interrupt waits for a nested VM-Exit)."""
    vmx = to_vmx(vcpu)
    n = vmx.nested
    if not vmx.guest_mode or n is None or not n.pi_desc or n.pi_desc_map is None:
        return False
    kvm_vcpu_map_access(n.pi_desc_map, write=True, value=vector)       # pi_test_and_set_pir()
    vcpu.kvm.journal.count("nested_posted_interrupt")
    return True


# ---- SVM ------------------------------------------------------------------------------------------------

@dataclass
class NestedSvm:
    """What the model keeps of ``struct svm_nested_state``."""

    vmcb12_gpa: int | None = None
    guest_mode: bool = False


def to_svm_nested(vcpu) -> NestedSvm:
    s = vcpu.__dict__.get("svm_nested")
    if s is None:
        _need_x86(vcpu.kvm, "nested SVM")
        s = vcpu.__dict__["svm_nested"] = NestedSvm()
    return s


def nested_svm_vmrun(vcpu, vmcb12_gpa: int) -> NestedEntry:
    """Mirrors ``nested_svm_vmrun()``: ``kvm_vcpu_map(vcpu, gpa_to_gfn(vmcb12_gpa), &map)`` (-EINVAL →
    #GP, another error → skip the instruction), copy the vmcb12 controls and save area, enter L2, then
    ``kvm_vcpu_unmap(vcpu, &map, true)`` (v6.13: the map is writable)."""
    s = to_svm_nested(vcpu)
    if s.guest_mode:
        raise ModelError(errno.EINVAL, "nested_vmenter: the vCPU already runs L2 (nested_vmexit first)")
    m, e = _map(vcpu, vmcb12_gpa)
    if m is None:
        return NestedEntry("gp" if e == errno.EINVAL else "skipped", errno=e)
    kvm_vcpu_map_access(m, write=False)                 # nested_copy_vmcb_control_to_cache() / save
    s.vmcb12_gpa = vmcb12_gpa
    s.guest_mode = True
    kvm_vcpu_unmap(vcpu, m, True)
    vcpu.kvm.journal.count("nested_vmenter")
    return NestedEntry("entered", "merged")


def nested_svm_vmexit(vcpu, exit_code: int = 0x400) -> int:
    """Mirrors ``nested_svm_vmexit()``: map the vmcb12 again (a failure: #GP on -EINVAL, return), write
    the exit code and the L2 state into it, ``kvm_vcpu_unmap(vcpu, &map, true)``.  Returns 0 or the map's
    errno."""
    s = to_svm_nested(vcpu)
    if not s.guest_mode:
        raise ModelError(errno.EINVAL, "nested_vmexit: the vCPU does not run L2 (nested_vmenter first)")
    s.guest_mode = False
    m, e = _map(vcpu, s.vmcb12_gpa)
    if m is None:
        return e
    kvm_vcpu_map_access(m, write=True, value=exit_code)
    kvm_vcpu_unmap(vcpu, m, True)
    vcpu.kvm.journal.count("nested_vmexit")
    return 0
