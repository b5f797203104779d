"""The real ``/dev/kvm`` backend, in pure Python over ctypes (include/uapi/linux/kvm.h).

Modules: ``uapi`` (struct mirrors), ``ioctls`` (ioctl numbers), ``libc`` (syscalls), ``guest``
(x86-64 encoder, programs, boot image), ``vcpu`` (KVM_RUN loop), ``vm`` (memslots, dirty log/ring,
guest_memfd, kvmclock), ``host`` (mappings, host mm operations), ``stats`` (binary stats), ``caps``
(capabilities, policy), ``settings`` (host settings, only on request), ``dmesg`` (KVM warning
watch) and ``backend`` (``KvmBackend``).

Policy: the host's refcounting behaviour (legacy v6.12 vs the v6.13 series "KVM: Stop grabbing
references to PFNMAP'd pages") cannot be probed, since the series added no capability.  ``KvmBackend``
takes it from the kernel release (``>= 6.13`` means the series) unless ``policy=`` overrides it;
see ``caps.host_policy``.
"""

from kvmsim.backend.kvm.backend import KvmBackend
from kvmsim.backend.kvm.caps import host_policy

__all__ = ["KvmBackend", "host_policy"]
