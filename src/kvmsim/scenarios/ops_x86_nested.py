"""x86 scenario ops for nested VMX/SVM (:mod:`kvmsim.x86.nested`) and the VMX APIC-access page
(:mod:`kvmsim.x86.vmx`).

* ``nested_vmenter``: L1 runs L2.  ``mode = "vmx"`` (VMLAUNCH): the vmcs12 fields are guest physical
  addresses, each optional (leaving one out means its control is off): ``apic_access``
  (APIC_ACCESS_ADDR), ``virtual_apic`` (VIRTUAL_APIC_PAGE_ADDR), ``pi_desc`` (POSTED_INTR_DESC_ADDR),
  ``msr_bitmap`` (MSR_BITMAP), ``evmcs`` (a Hyper-V enlightened VMCS).  ``mode = "svm"`` (VMRUN):
  ``vmcb12``.  The result is ``entered``, ``internal_error`` (KVM_EXIT_INTERNAL_ERROR: no backing for the
  APIC-access address), ``vmentry_failed``, ``evmptrld_error``, SVM ``gp`` (#GP: ``kvm_vcpu_map()``
  -EINVAL) or ``skipped``; the value says how vmcs02 uses the MSR bitmap (``msr_bitmap=merged`` or
  ``msr_bitmap=intercept_all``) and whether posted interrupts are on.
* ``nested_vmexit``: L2 exits to L1 (``nested_vmx_vmexit()`` puts the vmcs12 pages;
  ``nested_svm_vmexit()`` writes the vmcb12); ``free`` (VMX) is VMXOFF, which also drops the eVMCS.
* ``nested_posted_interrupt``: KVM posts ``vector`` to L2 by writing L1's PI descriptor through its
  kernel mapping (``vmx_deliver_nested_posted_interrupt()``): ``posted`` or ``not_posted``.
* ``apic_access_alloc``: ``kvm_alloc_apic_access_page()`` (APICv on: KVM's internal memslot at
  0xfee00000).  The value is the APIC page's pfn if the allocation faulted it in (v6.12), else -1.
* ``apic_access_reload``: ``vcpu_enter_guest()`` handling KVM_REQ_APIC_PAGE_RELOAD
  (``vmx_set_apic_access_page_addr()``, steppable: an ``interleave`` can migrate the page between the
  pfn lookup, the lock and the release).  ``force`` reloads without a pending request (the first entry).
  The result is ``written`` (vmcs01's APIC_ACCESS_ADDR), ``retry`` (the request is raised again),
  ``deferred`` (L2 runs) or ``none``; the value is the pfn.
* ``apic_access_migrate``: ``migrate_pages()`` of the APIC-access page (the value is the new pfn; EAGAIN
  while KVM holds a reference).
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.scenarios.env import Env, Res, _done
from kvmsim.scenarios.loader import c_bool, c_choice, c_int, c_size

_NESTED_GPAS = ("apic_access", "virtual_apic", "pi_desc", "msr_bitmap", "evmcs", "vmcb12")

X86_NESTED_OP_ARGS = {
    "nested_vmenter": {"mode": (c_choice("vmx", "svm"), "vmx"), **{k: (c_size, None) for k in _NESTED_GPAS},
                       "vcpu": (c_int, 0)},
    "nested_vmexit": {"mode": (c_choice("vmx", "svm"), "vmx"), "free": (c_bool, False), "vcpu": (c_int, 0)},
    "nested_posted_interrupt": {"vector": (c_int, 0x20), "vcpu": (c_int, 0)},
    "apic_access_alloc": {},
    "apic_access_reload": {"vcpu": (c_int, 0), "force": (c_bool, True)},
    "apic_access_migrate": {},
}


def op_nested_vmenter(env: Env, a: dict):
    from kvmsim.x86.nested import Vmcs12, nested_svm_vmrun, nested_vmx_enter_non_root_mode
    vcpu = env.vcpu(a["vcpu"])
    if a["mode"] == "svm":
        if a["vmcb12"] is None:
            raise ModelError(errno.EINVAL, "nested_vmenter mode = \"svm\" needs vmcb12 (VMRUN's rax)")
        r = nested_svm_vmrun(vcpu, a["vmcb12"])
    else:
        if a["vmcb12"] is not None:
            raise ModelError(errno.EINVAL, "nested_vmenter: vmcb12 is SVM's; use mode = \"svm\"")
        r = nested_vmx_enter_non_root_mode(vcpu, Vmcs12(a["apic_access"], a["virtual_apic"], a["pi_desc"],
                                                        a["msr_bitmap"]), a["evmcs"])
    yield from _done(f"nested_vmenter ({a['mode']}): {r.result}")
    return Res(r.result, value=r.summary())


def op_nested_vmexit(env: Env, a: dict):
    from kvmsim.x86.nested import nested_svm_vmexit, nested_vmx_vmexit
    vcpu = env.vcpu(a["vcpu"])
    if a["mode"] == "svm":
        e = nested_svm_vmexit(vcpu)
        yield from _done("nested_svm_vmexit done")
        return Res("ok" if not e else "gp" if e == errno.EINVAL else "failed")
    nested_vmx_vmexit(vcpu, free=a["free"])
    yield from _done("nested_vmx_vmexit done")
    return Res("ok")


def op_nested_posted_interrupt(env: Env, a: dict):
    from kvmsim.x86.nested import vmx_deliver_nested_posted_interrupt
    posted = vmx_deliver_nested_posted_interrupt(env.vcpu(a["vcpu"]), a["vector"])
    yield from _done("vmx_deliver_nested_posted_interrupt done")
    return Res("posted" if posted else "not_posted")


def _apic_pfn(env: Env) -> int:
    from kvmsim.x86.vmx import kvm_apic_access
    hva = kvm_apic_access(env.kvm).hva
    if hva < 0:
        raise ModelError(errno.EINVAL, "no APIC-access page: run apic_access_alloc first")
    return env.mm.pte_of(hva)[1]


def op_apic_access_alloc(env: Env, a: dict):
    from kvmsim.x86.vmx import kvm_alloc_apic_access_page
    kvm_alloc_apic_access_page(env.kvm)
    yield from _done("kvm_alloc_apic_access_page done")
    return Res("ok", value=int(_apic_pfn(env)))


def op_apic_access_reload(env: Env, a: dict):
    from kvmsim.x86.vmx import kvm_vcpu_reload_apic_access_page
    r = yield from kvm_vcpu_reload_apic_access_page.steps(env.vcpu(a["vcpu"]), force=a["force"])
    return Res(r.result, value=r.pfn)


def op_apic_access_migrate(env: Env, a: dict):
    from kvmsim.mm.reclaim import migrate_page
    from kvmsim.x86.vmx import kvm_apic_access
    _apic_pfn(env)
    new = migrate_page(env.mm, kvm_apic_access(env.kvm).hva)
    yield from _done("migrate_pages(APIC-access page) done")
    return Res("ok", value=new)


X86_NESTED_OPS = {"nested_vmenter": op_nested_vmenter, "nested_vmexit": op_nested_vmexit,
                  "nested_posted_interrupt": op_nested_posted_interrupt,
                  "apic_access_alloc": op_apic_access_alloc, "apic_access_reload": op_apic_access_reload,
                  "apic_access_migrate": op_apic_access_migrate}
