"""KVM_CREATE_VM failures in the real backend: EINTR is retried (QEMU's ``kvm_init()``), any other
errno is raised as ``KvmIoctlError`` naming the ioctl, never an AttributeError from the cleanup.

These tests fake the ioctl, so they need no /dev/kvm; one also runs on the real device when usable.
"""

from __future__ import annotations

import errno

import pytest

from kvmsim.backend.base import VmOptions
from kvmsim.backend.kvm import ioctls
from kvmsim.backend.kvm.vm import KvmVm
from kvmsim.errors import KvmIoctlError

CAPS = {"nr_memslots": 32, "vcpu_mmap_size": 12288}


def _fake_create_vm(monkeypatch, answers):
    """Answer KVM_CREATE_VM with ``answers`` in order (``(ret, errno)``); other ioctls pass through."""
    calls = []
    real = ioctls.raw_ioctl

    def fake(fd, request, arg=None):
        if request == ioctls.KVM_CREATE_VM:
            calls.append(request)
            return answers[len(calls) - 1]
        return real(fd, request, arg)

    monkeypatch.setattr(ioctls, "raw_ioctl", fake)
    return calls


def test_create_vm_retries_eintr_then_returns_the_fd(monkeypatch):
    calls = _fake_create_vm(monkeypatch, [(-1, errno.EINTR), (-1, errno.EINTR), (42, 0)])
    assert ioctls.kvm_create_vm(-1) == 42
    assert len(calls) == 3


def test_create_vm_einval_raises_the_ioctl_error(monkeypatch):
    calls = _fake_create_vm(monkeypatch, [(-1, errno.EINVAL), (42, 0)])
    with pytest.raises(KvmIoctlError) as ei:
        ioctls.kvm_create_vm(-1)
    assert ei.value.ioctl == "KVM_CREATE_VM" and ei.value.errno == errno.EINVAL
    assert "EINVAL" in str(ei.value)
    assert len(calls) == 1                       # not retried


def test_vm_whose_create_fails_raises_the_real_error_not_attributeerror(monkeypatch):
    _fake_create_vm(monkeypatch, [(-1, errno.ENOMEM)])
    with pytest.raises(KvmIoctlError) as ei:
        KvmVm(-1, VmOptions(), CAPS)
    assert ei.value.ioctl == "KVM_CREATE_VM" and ei.value.errno == errno.ENOMEM


def test_vm_create_after_eintr_on_the_real_device(monkeypatch):
    """With /dev/kvm: one EINTR, then the real KVM_CREATE_VM; the VM works and closes."""
    from tests.backend.conftest import require_kvm
    require_kvm()
    from kvmsim.backend.kvm.backend import KvmBackend

    be = KvmBackend()
    try:
        real = ioctls.raw_ioctl
        calls = []

        def fake(fd, request, arg=None):
            if request == ioctls.KVM_CREATE_VM:
                calls.append(request)
                if len(calls) == 1:
                    return -1, errno.EINTR
            return real(fd, request, arg)

        be.capabilities()                        # its scratch VM before the fake
        monkeypatch.setattr(ioctls, "raw_ioctl", fake)
        be.create_vm(VmOptions())
        assert len(calls) == 2 and be.vm is not None and be.vm.fd >= 0
    finally:
        be.close()
