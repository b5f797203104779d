"""kvmsim: an executable model of KVM's guest-memory MMU.

It models how KVM turns a guest frame number into a host pfn and who owns the page behind it, under
two protocols: ``legacy`` (Linux v6.12) and ``series`` (v6.13, "KVM: Stop grabbing references to
PFNMAP'd pages"), and checks the result against the real ``/dev/kvm``.

Layout follows the kernel's split: ``mm/`` (host primary MMU), ``kvm/`` (virt/kvm), ``x86/``
(arch/x86/kvm/mmu), ``policies/`` (the only place legacy and series differ), ``check`` (invariant
validators), ``scenarios/``, ``explore/``, ``backend/`` (the seam to the real /dev/kvm) and ``cli``.
"""

__version__ = "0.1.0"
