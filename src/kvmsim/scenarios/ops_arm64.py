"""arm64 scenario ops: ``mte_copy_tags`` (``KVM_ARM_MTE_COPY_TAGS``, arch/arm64/kvm/guest.c
``kvm_vm_ioctl_mte_copy_tags()``; the model is :mod:`kvmsim.arm64.mte`).

``ARM64_OP_ARGS`` / ``ARM64_OPS`` are merged into :data:`kvmsim.scenarios.ops.OP_ARGS` / ``OPS``.
"""

from __future__ import annotations

from kvmsim.scenarios.env import Env, Res, _done
from kvmsim.scenarios.loader import REQUIRED, c_choice, c_int, c_size
from kvmsim.types import PAGE_SIZE

ARM64_OP_ARGS = {
    # KVM_ARM_MTE_COPY_TAGS: guest_ipa = gpa, length = size; to_guest writes ``tag`` into every page's
    # allocation tags, from_guest reads them (the step's value: one tag per page)
    "mte_copy_tags": {"gpa": (c_size, REQUIRED), "size": (c_size, PAGE_SIZE),
                      "direction": (c_choice("to_guest", "from_guest"), "to_guest"), "tag": (c_int, 1)},
}


def op_mte_copy_tags(env: Env, a: dict):
    """``ioctl(vm_fd, KVM_ARM_MTE_COPY_TAGS, &(struct kvm_arm_copy_mte_tags){...})``: the result is
    ``ok`` when every page was done, ``partial`` when the kernel stopped part way (its return value is
    the bytes done); an error with nothing done is the step's errno (EFAULT, EBUSY, EINVAL)."""
    from kvmsim.arm64.mte import KVM_ARM_TAGS_FROM_GUEST, kvm_vm_ioctl_mte_copy_tags
    from_guest = a["direction"] == "from_guest"
    done, tags = kvm_vm_ioctl_mte_copy_tags(env.kvm, a["gpa"], a["size"],
                                            KVM_ARM_TAGS_FROM_GUEST if from_guest else 0, a["tag"])
    yield from _done("KVM_ARM_MTE_COPY_TAGS done")
    return Res("ok" if done == a["size"] else "partial", value=tags if from_guest else done)


ARM64_OPS = {"mte_copy_tags": op_mte_copy_tags}
