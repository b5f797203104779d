"""Scenario step operations: each one a kernel path (a generator) on the scenario's host and VM.

``OP_ARGS`` is the schema the loader checks a ``[[step]]`` against; ``OPS`` maps an op to a
generator function ``(env, args) -> Res``.  Ops whose kernel path can race (``fault``, ``munmap``,
``writeback`` of one folio, ``pfncache_refresh``, ...) yield at the model's preemption points, so
an ``interleave`` step can run them against each other with :meth:`kvmsim.sched.Scheduler.run_interleaved`;
every other op runs to completion in one scheduling step.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from kvmsim.errors import EHWPOISON, ModelError
from kvmsim.kvm.fault import FaultRet
from kvmsim.mm.mm import MADVISE_ADVICE
from kvmsim.scenarios.loader import (
    MAX_BYTES,
    MAX_COUNT,
    REQUIRED,
    c_any,
    c_bool,
    c_bounded,
    c_choice,
    c_int,
    c_memflags,
    c_size,
    c_str,
    c_strlist,
)
from kvmsim.scenarios.env import Env, Res, _done, _flags  # noqa: F401  (re-exported)
from kvmsim.scenarios.host_ops import (  # noqa: F401
    op_munmap,
    op_mprotect,
    op_madvise,
    op_mremap,
    op_fork,
    op_writeback,
    op_reclaim,
    op_migrate,
    op_thp_split,
    op_thp_collapse,
    op_truncate,
    op_punch_hole,
    op_driver_teardown,
    op_host_access,
    op_folio_referenced,
)
from kvmsim.scenarios.ops_s390 import S390_OP_ARGS, S390_OPS
from kvmsim.scenarios.ops_x86_nested import X86_NESTED_OP_ARGS, X86_NESTED_OPS
from kvmsim.scenarios.ops_arm64 import ARM64_OP_ARGS, ARM64_OPS
from kvmsim.scenarios.ops_ppc_book3s import PPC_BOOK3S_OP_ARGS, PPC_BOOK3S_OPS
from kvmsim.scenarios.ops_ppc_e500 import PPC_E500_OP_ARGS, PPC_E500_OPS
from kvmsim.scenarios.ops_gmem import GMEM_OP_ARGS, GMEM_OPS, memory_fault_value
from kvmsim.scenarios.ops_x86_shadow import X86_SHADOW_OP_ARGS, X86_SHADOW_OPS
from kvmsim.scenarios.ops_reach import REACH_OP_ARGS, REACH_OPS, fatal_signal_pending
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE


_COUNT = c_bounded(c_int, 1, MAX_COUNT, "a page count")
_GUEST = {"gpa": (c_size, REQUIRED), "count": (_COUNT, 1), "stride": (c_size, PAGE_SIZE), "vcpu": (c_int, 0),
          "private": (c_bool, None)}                # the guest's C-bit / shared bit (kvmsim.scenarios.ops_gmem)
_RANGE = {"vma": (c_str, REQUIRED), "offset": (c_size, 0), "size": (c_size, None)}
# the advice Mm.madvise() models, as "dontneed" or "madv_dontneed"
_MADVISE_ADVICE = tuple(p + a.lower() for a in MADVISE_ADVICE for p in ("", "madv_"))
_AT = {"vma": (c_str, REQUIRED), "offset": (c_size, 0)}

OP_ARGS: dict[str, dict[str, tuple[Callable, Any]]] = {
    # guest
    "read": _GUEST,
    "write": {**_GUEST, "value": (c_int, 1)},
    "fault": {"gpa": (c_size, REQUIRED), "write": (c_bool, False), "vcpu": (c_int, 0), "private": (c_bool, None),
              "exec": (c_bool, False), "signal_pending": (c_bool, False)},
    "store": {"gpa": (c_size, REQUIRED), "value": (c_int, 1), "vcpu": (c_int, 0)},
    "zap": {"gpa": (c_size, REQUIRED)},
    # host
    "munmap": _RANGE,
    "mprotect": {**_RANGE, "prot": (c_choice("rw", "r", "w", "none"), REQUIRED)},
    "madvise": {**_RANGE, "advice": (c_choice(*_MADVISE_ADVICE), REQUIRED)},
    "mremap": {"vma": (c_str, REQUIRED), "to": (c_str, None)},
    "fork": {},
    "writeback": {"vma": (c_str, REQUIRED), "offset": (c_size, None)},
    "reclaim": _RANGE,
    "migrate": _AT,
    "thp_split": _AT,
    "thp_collapse": _AT,
    "truncate": {"vma": (c_str, REQUIRED), "size": (c_size, REQUIRED)},
    "punch_hole": {"vma": (c_str, REQUIRED), "offset": (c_size, REQUIRED), "size": (c_size, REQUIRED)},
    "driver_teardown": {"driver": (c_str, REQUIRED)},
    "host_write": {**_AT, "value": (c_int, 1)},
    "host_read": _AT,
    "folio_referenced": {**_AT, "count": (_COUNT, 1)},
    # KVM
    "memslot_set": {"id": (c_int, REQUIRED), "gpa": (c_size, REQUIRED),
                    "size": (c_bounded(c_size, 0, MAX_BYTES, "a memslot size"), REQUIRED),
                    "vma": (c_str, REQUIRED), "offset": (c_size, 0), "flags": (c_memflags, ())},
    "memslot_delete": {"id": (c_int, REQUIRED)},
    "memslot_move": {"id": (c_int, REQUIRED), "gpa": (c_size, REQUIRED)},
    "memslot_flags": {"id": (c_int, REQUIRED), "flags": (c_memflags, ())},
    "get_dirty_log": {"slot": (c_int, REQUIRED)},
    "clear_dirty_log": {"slot": (c_int, REQUIRED), "first": (c_int, 0), "num": (c_int, None)},
    "ring_harvest": {"vcpu": (c_int, 0)},
    # a signal becomes pending once this many entries are reset (-1: none): v6.17 stops there
    "ring_reset": {"signal_after": (c_int, -1)},
    "vcpu_map": {"gpa": (c_size, REQUIRED), "writable": (c_bool, True), "name": (c_str, "map"), "vcpu": (c_int, 0)},
    "vcpu_unmap": {"name": (c_str, "map"), "dirty": (c_bool, False)},
    "map_access": {"name": (c_str, "map"), "write": (c_bool, False), "value": (c_int, 1)},
    "gfn_to_page": {"gpa": (c_size, REQUIRED), "write": (c_bool, True), "name": (c_str, "page")},
    "release_page": {"name": (c_str, "page"), "dirty": (c_bool, False)},
    "pfncache_activate": {"gpa": (c_size, REQUIRED), "name": (c_str, "gpc"), "length": (c_int, 32)},
    "pfncache_refresh": {"name": (c_str, "gpc")},
    "pfncache_write": {"name": (c_str, "gpc"), "value": (c_int, 1)},
    "pfncache_check": {"name": (c_str, "gpc")},
    "age": {**_RANGE, "how": (c_choice("clear_young", "clear_flush_young", "test_young"), "clear_young")},
    "vm_destroy": {},
    "interleave": {"threads": (c_any, REQUIRED), "order": (c_strlist, REQUIRED)},
    **S390_OP_ARGS,
    **X86_SHADOW_OP_ARGS,
    **ARM64_OP_ARGS,
    **PPC_BOOK3S_OP_ARGS,
    **PPC_E500_OP_ARGS,
    **X86_NESTED_OP_ARGS,
    **GMEM_OP_ARGS,
    **REACH_OP_ARGS,
}

#: Ops that may be a thread of an ``interleave`` step (all but interleave itself).
INTERLEAVABLE = frozenset(OP_ARGS) - {"interleave"}

#: Ops on the host alone (the VMM's mm, its files and drivers); every other op is an ioctl on the VM
#: or a vCPU, or in-kernel KVM work on the VM, and needs the VM to exist.
HOST_OPS = frozenset({"munmap", "mprotect", "madvise", "mremap", "fork", "writeback", "reclaim", "migrate",
                      "thp_split", "thp_collapse", "truncate", "punch_hole", "driver_teardown", "host_write",
                      "host_read", "folio_referenced", "age"})


# ---- guest ---------------------------------------------------------------------------------------------

BULK_THRESHOLD = 64


def op_access(env: Env, a: dict, write: bool):
    vcpu = env.vcpu(a["vcpu"])
    vcpu.pferr_private = a.get("private")
    try:
        return (yield from _op_access(env, a, write, vcpu))
    finally:
        vcpu.pferr_private = None


def _op_access(env: Env, a: dict, write: bool, vcpu):
    bulk = getattr(env.kvm.arch, "guest_access_range", None)
    if a["count"] > BULK_THRESHOLD and a["stride"] == PAGE_SIZE and bulk is not None and \
            a.get("private") is None and not env.kvm.mem_attr_array:
        # the x86 MMU's vectorised path: same faults and bits, one numpy pass per round
        before = env.kvm.journal.counters["range_access_exit"]
        out = bulk(vcpu, a["gpa"], a["count"], write, a.get("value") if write else None)
        exits = env.kvm.journal.counters["range_access_exit"] - before
        yield from _done("guest access range done")
        return Res("ok" if not exits else f"exit×{exits}", 0, None if write else int(out[-1]))
    per, err, value = [], 0, None
    for k in range(a["count"]):
        acc = vcpu.access(a["gpa"] + k * a["stride"], write, a.get("value") if write else None)
        per.append(acc.exit.value)
        err = err or acc.errno
        if not write:
            value = acc.value
    yield from _done("guest access done")
    result = per[0] if len(set(per)) == 1 else ",".join(per)
    if "livelock" in per:
        k = per.index("livelock")
        value = (f"livelock at gpa {a['gpa'] + k * a['stride']:#x}: every re-entry of the guest faulted and "
                 "retried (RET_PF_RETRY) with nothing in this step able to end the invalidation or memslot "
                 "update it waits for")
        return Res(result, err, value, per)
    return Res(result, err, value if a["count"] == 1 else None, per)


def op_fault(env: Env, a: dict):
    vcpu = env.vcpu(a["vcpu"])
    vcpu.pferr_private, vcpu.memory_fault = a.get("private"), None
    try:
        with fatal_signal_pending(env.mm, a.get("signal_pending", False)):
            r = yield from env.kvm.arch.page_fault.steps(vcpu, a["gpa"], a["write"], a.get("exec", False))
    finally:
        vcpu.pferr_private = None
    r = int(r)
    if r < 0 and vcpu.memory_fault is not None:                  # KVM_EXIT_MEMORY_FAULT
        return Res("memory-fault", -r, memory_fault_value(vcpu))
    if r < 0:
        return Res({errno.EFAULT: "efault", errno.EINTR: "eintr", EHWPOISON: "hwpoison"}.get(-r, "error"), -r)
    return Res(FaultRet(r).name.lower())


def op_store(env: Env, a: dict):
    """A guest store as a steppable path: through the SPTE (fast page fault, hardware D) or a fault."""
    from kvmsim.explore.scenarios import guest_write
    if not hasattr(env.kvm.arch, "_tables"):
        raise ModelError(errno.EINVAL, "store is a steppable guest store for arch = \"generic\"; use write otherwise")
    vcpu = env.vcpu(a["vcpu"])
    if env.kvm.gfn_to_memslot(a["gpa"] >> PAGE_SHIFT) is None:
        yield from _done("guest: no memslot")              # kvm_handle_noslot_fault(): an MMIO exit
        return Res("mmio")
    ok = yield from guest_write.steps(env.kvm, vcpu, a["gpa"], a["value"])
    return Res("ok" if ok else "faulted")


def op_zap(env: Env, a: dict):
    """``kvm_zap_gfn_range()`` of one gfn under mmu_lock, outside the mmu_notifier."""
    from kvmsim.x86.mmu import kvm_zap_gfn_range
    if not hasattr(env.kvm.arch, "zap_leaf"):
        raise ModelError(errno.EINVAL, "zap needs an arch with a steppable zap_leaf (arch = \"generic\")")
    if env.kvm.gfn_to_memslot(a["gpa"] >> PAGE_SHIFT) is None:
        yield from _done("kvm_zap_gfn_range: no memslot")  # nothing mapped there, nothing to zap
        return Res("ok")
    yield from kvm_zap_gfn_range.steps(env.kvm, a["gpa"] >> PAGE_SHIFT)
    return Res("ok")


# ---- KVM -------------------------------------------------------------------------------------------------

def op_memslot_set(env, a):
    change = env.kvm.set_user_memory_region(a["id"], a["gpa"], a["size"], env.hva(a["vma"], a["offset"]),
                                            _flags(a["flags"]))
    yield from _done("KVM_SET_USER_MEMORY_REGION done")
    return Res(change.value if change is not None else "no-op")


def _slot_call(env, sid, gpa=None, size=None, flags=None):
    s = env.slot(sid)
    return env.kvm.set_user_memory_region(sid, (s.base_gfn << PAGE_SHIFT) if gpa is None else gpa,
                                          (s.npages << PAGE_SHIFT) if size is None else size, s.userspace_addr,
                                          int(s.flags) & 0xFFFF if flags is None else flags)


def op_memslot_delete(env, a):
    change = _slot_call(env, a["id"], size=0)
    yield from _done("memslot deleted")
    return Res(change.value if change is not None else "no-op")


def op_memslot_move(env, a):
    change = _slot_call(env, a["id"], gpa=a["gpa"])
    yield from _done("memslot moved")
    return Res(change.value if change is not None else "no-op")


def op_memslot_flags(env, a):
    change = _slot_call(env, a["id"], flags=_flags(a["flags"]))
    yield from _done("memslot flags changed")
    return Res(change.value if change is not None else "no-op")


def op_get_dirty_log(env, a):
    from kvmsim.kvm.dirty import kvm_get_dirty_log
    bm = kvm_get_dirty_log(env.kvm, a["slot"])
    yield from _done("KVM_GET_DIRTY_LOG done")
    return Res("ok", value=int(bm.sum()))


def op_clear_dirty_log(env, a):
    from kvmsim.kvm.dirty import kvm_clear_dirty_log
    s = env.slot(a["slot"])
    num = a["num"] if a["num"] is not None else s.npages - a["first"]
    kvm_clear_dirty_log(env.kvm, a["slot"], a["first"], num)
    yield from _done("KVM_CLEAR_DIRTY_LOG done")
    return Res("ok")


def op_ring_harvest(env, a):
    from kvmsim.kvm.dirty import kvm_dirty_ring_harvest
    n = len(kvm_dirty_ring_harvest(env.kvm, env.vcpu(a["vcpu"])))
    yield from _done("dirty ring harvested")
    return Res("ok", value=n)


def op_ring_reset(env, a):
    from kvmsim.kvm.dirty import kvm_reset_dirty_rings
    n = kvm_reset_dirty_rings(env.kvm, None if a["signal_after"] < 0 else a["signal_after"])
    yield from _done("KVM_RESET_DIRTY_RINGS done")
    return Res("ok", value=n)


def op_vcpu_map(env, a):
    from kvmsim.kvm.host_map import kvm_vcpu_map
    m = kvm_vcpu_map(env.vcpu(a["vcpu"]), a["gpa"] >> PAGE_SHIFT, a["writable"])
    env.maps[a["name"]] = m
    yield from _done("kvm_vcpu_map done")
    return Res("pinned" if m.pinned_page is not None else "unpinned", value=m.pfn)


def _named(table: dict, name: str, what: str):
    if name not in table:
        raise ModelError(errno.EINVAL, f"no {what} named {name!r}")
    return table[name]


def op_vcpu_unmap(env, a):
    from kvmsim.kvm.host_map import kvm_vcpu_unmap
    m = _named(env.maps, a["name"], "kvm_vcpu_map")
    kvm_vcpu_unmap(m.vcpu, m, a["dirty"])
    del env.maps[a["name"]]
    yield from _done("kvm_vcpu_unmap done")
    return Res("ok")


def op_map_access(env, a):
    from kvmsim.kvm.host_map import kvm_vcpu_map_access
    got = kvm_vcpu_map_access(_named(env.maps, a["name"], "kvm_vcpu_map"), a["write"], a["value"])
    yield from _done("kvm_host_map access done")
    return Res("ok", value=got)


def op_gfn_to_page(env, a):
    from kvmsim.kvm.pfn import gfn_to_page
    page = gfn_to_page(env.kvm, a["gpa"] >> PAGE_SHIFT, a["write"])
    env.pages[a["name"]] = page
    yield from _done("gfn_to_page done")
    return Res("page" if page is not None else "null", value=page)


def op_release_page(env, a):
    from kvmsim.kvm.pfn import kvm_release_gfn_page
    page = _named(env.pages, a["name"], "gfn_to_page result")
    if page is not None:
        kvm_release_gfn_page(env.kvm, page, a["dirty"])
    del env.pages[a["name"]]
    yield from _done("page released")
    return Res("ok" if page is not None else "no-op")


def op_pfncache_activate(env, a):
    from kvmsim.kvm.pfncache import GfnToPfnCache
    gpc = env.gpcs.get(a["name"]) or GfnToPfnCache(env.kvm)
    env.gpcs[a["name"]] = gpc
    gpc.active = True
    gpc.gpa = a["gpa"]
    gpc.length = a["length"]
    pfn = yield from gpc.refresh_steps.steps(a["length"])
    return Res("valid", value=pfn)


def op_pfncache_refresh(env, a):
    gpc = _named(env.gpcs, a["name"], "pfncache")
    pfn = yield from gpc.refresh_steps.steps(getattr(gpc, "length", 32))
    return Res("valid", value=pfn)


def op_pfncache_write(env, a):
    gpc = _named(env.gpcs, a["name"], "pfncache")
    ok = gpc.write(a["value"], getattr(gpc, "length", 32))
    yield from _done("pfncache write done")
    return Res("written" if ok else "skipped")


def op_pfncache_check(env, a):
    gpc = _named(env.gpcs, a["name"], "pfncache")
    ok = gpc.check(getattr(gpc, "length", 32))
    yield from _done("kvm_gpc_check done")
    return Res("valid" if ok else "invalid")


def op_age(env, a):
    start, size = env.span(a)
    if a["how"] == "test_young":
        young = env.mm.test_young(start)
    elif a["how"] == "clear_flush_young":
        young = env.mm.clear_flush_young(start, start + size)
    else:
        young = env.mm.clear_young(start, start + size)
    yield from _done("aging done")
    return Res("young" if young else "old")


def op_vm_destroy(env, a):
    env.kvm.destroy()
    yield from _done("VM destroyed")
    return Res("ok")


def guarded(gen):
    """Run a step's generator, turning a ModelError into a result (the kernel returned an errno)."""
    try:
        res = yield from gen
    except ModelError as e:
        return Res("error", e.errno, value=str(e))
    return res


def op_interleave(env, a):
    ops = [st.op for st in a["threads"].values()]
    if "vm_destroy" in ops and any(op not in HOST_OPS for op in ops if op != "vm_destroy") or ops.count("vm_destroy") > 1:
        # kvm_destroy_vm() runs when the last reference to the VM goes: never while an ioctl on it runs
        raise ModelError(errno.EINVAL, "vm_destroy cannot run while another thread uses the VM "
                                       "(kvm_destroy_vm() runs after the last VM and vCPU fd is closed)")
    threads = {name: guarded(make_gen(env, st.op, st.args)) for name, st in a["threads"].items()}
    results = env.host.sched.run_interleaved(threads, a["order"])
    parts = [f"{n}:{results[n].result}" for n in a["threads"]]
    err = next((results[n].errno for n in a["threads"] if results[n].errno), 0)
    yield from ()
    return Res(" ".join(parts), err, value={n: results[n].value for n in a["threads"]})


OPS: dict[str, Callable] = {
    "read": lambda env, a: op_access(env, a, False),
    "write": lambda env, a: op_access(env, a, True),
    "fault": op_fault, "store": op_store, "zap": op_zap, "folio_referenced": op_folio_referenced,
    "munmap": op_munmap, "mprotect": op_mprotect, "madvise": op_madvise, "mremap": op_mremap,
    "fork": op_fork, "writeback": op_writeback, "reclaim": op_reclaim, "migrate": op_migrate,
    "thp_split": op_thp_split, "thp_collapse": op_thp_collapse, "truncate": op_truncate,
    "punch_hole": op_punch_hole, "driver_teardown": op_driver_teardown,
    "host_write": lambda env, a: op_host_access(env, a, True),
    "host_read": lambda env, a: op_host_access(env, a, False),
    "memslot_set": op_memslot_set, "memslot_delete": op_memslot_delete, "memslot_move": op_memslot_move,
    "memslot_flags": op_memslot_flags, "get_dirty_log": op_get_dirty_log, "clear_dirty_log": op_clear_dirty_log,
    "ring_harvest": op_ring_harvest, "ring_reset": op_ring_reset, "vcpu_map": op_vcpu_map,
    "vcpu_unmap": op_vcpu_unmap, "map_access": op_map_access, "gfn_to_page": op_gfn_to_page,
    "release_page": op_release_page, "pfncache_activate": op_pfncache_activate,
    "pfncache_refresh": op_pfncache_refresh, "pfncache_write": op_pfncache_write,
    "pfncache_check": op_pfncache_check, "age": op_age, "vm_destroy": op_vm_destroy, "interleave": op_interleave,
    **S390_OPS,
    **X86_SHADOW_OPS,
    **ARM64_OPS,
    **PPC_BOOK3S_OPS,
    **PPC_E500_OPS,
    **X86_NESTED_OPS,
    **GMEM_OPS,
    **REACH_OPS,
}
assert set(OPS) == set(OP_ARGS)


#: Ops that run inside ``srcu_read_lock(&kvm->srcu)`` across their preemption points (a vCPU fault
#: holds its memslot): KVM_SET_USER_MEMORY_REGION's ``synchronize_srcu_expedited()`` waits for them.
SRCU_READERS = frozenset({"fault", "store", "tlbwe"})
#: Ops that change the memslots and so wait for every SRCU reader (``kvm_swap_active_memslots()``).
MEMSLOT_UPDATES = frozenset({"memslot_set", "memslot_delete", "memslot_move", "memslot_flags"})


def make_gen(env: Env, op: str, args: dict):
    """The generator running ``op`` with ``args`` on ``env``."""
    if op in HOST_OPS or op == "interleave":
        return OPS[op](env, args)
    if op in SRCU_READERS:
        return _on_vm(env, op, args, _srcu_read)
    if op in MEMSLOT_UPDATES:
        return _on_vm(env, op, args, _synchronize_srcu)
    return _on_vm(env, op, args)


def _srcu_read(env: Env, op: str, args: dict):
    """``srcu_read_lock(&kvm->srcu)`` around the op (vcpu_enter_guest / KVM_RUN hold it over a fault)."""
    env.kvm.srcu_readers = getattr(env.kvm, "srcu_readers", 0) + 1
    try:
        return (yield from OPS[op](env, args))
    finally:
        env.kvm.srcu_readers -= 1


def _synchronize_srcu(env: Env, op: str, args: dict):
    """A memslot update publishes the new memslots only after ``synchronize_srcu_expedited()``: it waits
    until no fault still uses the old ones (virt/kvm/kvm_main.c ``kvm_swap_active_memslots()``)."""
    from kvmsim.sched import Wait
    kvm = env.kvm
    while getattr(kvm, "srcu_readers", 0):
        yield Wait("synchronize_srcu_expedited(&kvm->srcu)", lambda: not getattr(kvm, "srcu_readers", 0))
    return (yield from OPS[op](env, args))


def _on_vm(env: Env, op: str, args: dict, run=None):
    """An op on the VM: after ``vm_destroy`` its fds are closed, so every ioctl on it is EBADF (and the
    in-kernel users of a VM, pfncaches and host maps, are gone with it)."""
    if env.kvm.destroyed:
        raise ModelError(errno.EBADF, f"{op}: the VM was destroyed (vm_destroy); its VM and vCPU fds are closed")
    if run is not None:
        return (yield from run(env, op, args))
    return (yield from OPS[op](env, args))
