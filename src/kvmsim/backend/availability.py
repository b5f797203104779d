"""Whether the real ``/dev/kvm`` can be used here (virt/kvm/kvm_main.c: ``kvm_dev_ioctl``, API version 12).

``KVMSIM_REAL_KVM`` selects the policy:

* unset (or empty): use ``/dev/kvm`` when it works, skip real-KVM tests with a reason otherwise;
* ``0``: never touch ``/dev/kvm`` (every real-KVM test skips);
* ``1``: require it (real-KVM tests fail instead of skipping when it is unusable).

This module never imports the rest of the backend, so the pure model and the CLI can ask cheaply.
"""

from __future__ import annotations

import errno
import fcntl
import os

ENV = "KVMSIM_REAL_KVM"
KVM_DEV = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00   # _IO(KVMIO, 0x00)
KVM_API_VERSION = 12


def real_kvm_mode() -> str:
    """``"auto"``, ``"off"`` or ``"force"`` from ``$KVMSIM_REAL_KVM``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "no", "off", "false"):
        return "off"
    if value in ("1", "yes", "on", "true", "force"):
        return "force"
    return "auto"


def kvm_available(path: str = KVM_DEV) -> tuple[bool, str]:
    """``(True, "")`` when ``path`` opens and speaks KVM API 12, else ``(False, reason)``."""
    if real_kvm_mode() == "off":
        return False, f"real /dev/kvm disabled by {ENV}=0"
    if not os.path.exists(path):
        return False, f"{path} is absent (no KVM on this host)"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return False, f"no permission to open {path} (add yourself to the kvm group or run as root)"
        return False, f"cannot open {path}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return False, f"KVM_GET_API_VERSION on {path} failed: {e.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"{path} speaks KVM API {version}, kvmsim needs {KVM_API_VERSION}"
    return True, ""
