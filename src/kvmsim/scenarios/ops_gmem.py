"""Scenario ops for guest_memfd and private memory (:mod:`kvmsim.kvm.gmem`,
:mod:`kvmsim.kvm.memory_attributes`, :mod:`kvmsim.x86.private_mem`).

* ``gmem_create``: KVM_CREATE_GUEST_MEMFD (``name``, ``size``, ``flags``); at set-up a ``[[guest_memfd]]``
  table does the same, and a ``[[memslot]]`` with ``guest_memfd = "<name>"`` (``guest_memfd_offset``)
  binds it;
* ``gmem_memslot_set``: KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD (``id``, ``gpa``, ``size``,
  ``gmem`` = the file's name, ``gmem_offset``; ``vma`` and ``offset`` give the shared half's
  ``userspace_addr``, none: 0, where a shared access finds no memory);
* ``set_memory_attributes``: KVM_SET_MEMORY_ATTRIBUTES (``gpa``, ``size``, ``private`` = true for
  KVM_MEMORY_ATTRIBUTE_PRIVATE, false to make the range shared; ``attributes`` overrides it with a raw
  value, ``flags`` must be 0);
* ``gmem_punch_hole``: ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` on the file (``gmem``,
  ``offset``, ``size``);
* ``gmem_fallocate``: ``fallocate(mode)`` with a raw ``mode`` (its errnos).

The guest declares private or shared accesses with ``private = true / false`` on ``read``, ``write`` and
``fault`` steps (the C-bit / shared bit; left out, a KVM_X86_SW_PROTECTED_VM derives it from the
attributes).  A mismatch ends the access with ``memory-fault`` (KVM_EXIT_MEMORY_FAULT, errno EFAULT); a
``fault`` step's value is then ``{gpa, size, flags}`` of ``kvm_run.memory_fault``.
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.scenarios.env import Env, Res, _done
from kvmsim.scenarios.loader import REQUIRED, c_bool, c_int, c_size, c_str
from kvmsim.uapi import KVM_MEM, KVM_MEMORY_ATTRIBUTE_PRIVATE

GMEM_OP_ARGS = {
    "gmem_create": {"name": (c_str, "gmem"), "size": (c_size, REQUIRED), "flags": (c_int, 0)},
    "gmem_memslot_set": {"id": (c_int, REQUIRED), "gpa": (c_size, REQUIRED), "size": (c_size, REQUIRED),
                         "gmem": (c_str, "gmem"), "gmem_offset": (c_size, 0), "vma": (c_str, None),
                         "offset": (c_size, 0)},
    "set_memory_attributes": {"gpa": (c_size, REQUIRED), "size": (c_size, REQUIRED), "private": (c_bool, True),
                              "attributes": (c_int, None), "flags": (c_int, 0)},
    "gmem_punch_hole": {"gmem": (c_str, "gmem"), "offset": (c_size, REQUIRED), "size": (c_size, REQUIRED)},
    "gmem_fallocate": {"gmem": (c_str, "gmem"), "mode": (c_int, REQUIRED), "offset": (c_size, REQUIRED),
                       "size": (c_size, REQUIRED)},
}


def _gmems(env: Env) -> dict:
    return env.gmems


def _gmem(env: Env, name: str):
    g = _gmems(env).get(name)
    if g is None:
        raise ModelError(errno.EBADF, f"no guest_memfd named {name!r} (create it with a gmem_create step)")
    return g


def op_gmem_create(env: Env, a: dict):
    from kvmsim.kvm.gmem import GuestMemfd
    if a["name"] in _gmems(env):
        raise ModelError(errno.EINVAL, f"a guest_memfd named {a['name']!r} exists already (names must be unique)")
    _gmems(env)[a["name"]] = GuestMemfd(env.kvm, a["size"], a["flags"])
    yield from _done("KVM_CREATE_GUEST_MEMFD done")
    return Res("ok")


def op_gmem_memslot_set(env: Env, a: dict):
    hva = env.hva(a["vma"], a["offset"]) if a["vma"] is not None else 0
    change = env.kvm.set_user_memory_region(a["id"], a["gpa"], a["size"], hva, int(KVM_MEM.GUEST_MEMFD),
                                            guest_memfd=_gmem(env, a["gmem"]), guest_memfd_offset=a["gmem_offset"])
    yield from _done("KVM_SET_USER_MEMORY_REGION2 (guest_memfd) done")
    return Res(change.value if change is not None else "no-op")


def op_set_memory_attributes(env: Env, a: dict):
    from kvmsim.kvm.memory_attributes import kvm_vm_ioctl_set_mem_attributes
    attrs = a["attributes"] if a["attributes"] is not None else \
        (KVM_MEMORY_ATTRIBUTE_PRIVATE if a["private"] else 0)
    kvm_vm_ioctl_set_mem_attributes(env.kvm, a["gpa"], a["size"], attrs, a["flags"])
    yield from _done("KVM_SET_MEMORY_ATTRIBUTES done")
    return Res("ok")


def op_gmem_punch_hole(env: Env, a: dict):
    from kvmsim.kvm.gmem import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, kvm_gmem_fallocate
    kvm_gmem_fallocate(env.kvm, _gmem(env, a["gmem"]), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, a["offset"],
                       a["size"])
    yield from _done("fallocate(PUNCH_HOLE) on the guest_memfd done")
    return Res("ok")


def op_gmem_fallocate(env: Env, a: dict):
    from kvmsim.kvm.gmem import kvm_gmem_fallocate
    kvm_gmem_fallocate(env.kvm, _gmem(env, a["gmem"]), a["mode"], a["offset"], a["size"])
    yield from _done("fallocate on the guest_memfd done")
    return Res("ok")


def memory_fault_value(vcpu) -> dict | None:
    """``kvm_run.memory_fault`` as a step value (None if the last exit was not a memory fault)."""
    mf = vcpu.memory_fault
    return None if mf is None else mf.as_dict()


GMEM_OPS = {"gmem_create": op_gmem_create, "gmem_memslot_set": op_gmem_memslot_set,
            "set_memory_attributes": op_set_memory_attributes, "gmem_punch_hole": op_gmem_punch_hole,
            "gmem_fallocate": op_gmem_fallocate}
