"""A VM: memslots, ``mmu_lock``, invalidation tracking and the mmu_notifier handlers (virt/kvm/kvm_main.c).

Locking, as Documentation/virt/kvm/locking.rst puts it for what the model keeps:

- ``mmu_lock`` (rwlock on x86) protects the stage-2 tables and ``mmu_invalidate_*``;
- ``mmu_invalidate_seq`` is bumped at invalidate *end*; a fault samples it before resolving the pfn
  and re-checks it under ``mmu_lock`` (``mmu_invalidate_retry_gfn``) before installing a mapping;
- ``mn_active_invalidate_count`` is raised before any mmu_lock work and guards the pfncache.

Race the re-check closes (INV-5)::

    CPU0 (vCPU fault)                        | CPU1 (munmap)
    mmu_seq = kvm->mmu_invalidate_seq        |
    pfn = hva_to_pfn(hva)   (old page)       |
                                             | invalidate_range_start: zap SPTEs
                                             | zap host PTEs, free the page
                                             | invalidate_range_end: seq++
    write_lock(mmu_lock)                     |
    mmu_invalidate_retry_gfn(seq) → RETRY    |
    release the page unused, no SPTE         |
"""

from __future__ import annotations

import errno

from kvmsim.errors import KvmBug, ModelError
from kvmsim.kvm.memslot import (KVM_MEM, KvmMemorySlot, KvmMemslots, KvmMrChange, KvmUserspaceMemoryRegion2,
                                kvm_prepare_memory_region, new_memslot, validate_region)
from kvmsim.mm.notifier import MmuNotifierRange
from kvmsim.policies import DEFAULT_POLICY, Policy, get_policy
from kvmsim.sched import DEFAULT_SCHEDULER, Scheduler, Steps, Wait, kpath


class MmuLock:
    """``kvm->mmu_lock`` as an rwlock that records its holders by thread name (the world's
    scheduler's active thread)."""

    def __init__(self, name: str = "mmu_lock", sched: Scheduler = DEFAULT_SCHEDULER):
        self.name = name
        self.sched = sched
        self.writer: str | None = None
        self.readers: list[str] = []
        self._acquired = (f"write_lock({name}) acquired", f"read_lock({name}) acquired")   # the step labels

    def held(self, thread: str | None = None) -> bool:
        t = thread or self.sched.active
        return self.writer == t or (bool(self.readers) and t in self.readers)

    @kpath
    def write_lock(self) -> Steps:
        while self.writer is not None or self.readers:
            yield Wait(f"write_lock({self.name})", lambda: self.writer is None and not self.readers)
        self.writer = self.sched.active
        yield self._acquired[0]

    @kpath
    def read_lock(self) -> Steps:
        while self.writer is not None:
            yield Wait(f"read_lock({self.name})", lambda: self.writer is None)
        self.readers.append(self.sched.active)
        yield self._acquired[1]

    def write_unlock(self) -> None:
        if self.writer != self.sched.active:
            raise KvmBug(f"write_unlock({self.name}) by {self.sched.active}, held by {self.writer}")
        self.writer = None

    def read_unlock(self) -> None:
        self.readers.remove(self.sched.active)


class KvmMmuNotifier:
    """KVM's ``mmu_notifier_ops`` (``kvm_mmu_notifier_*``)."""

    def __init__(self, kvm: "Kvm"):
        self.kvm = kvm

    @kpath
    def invalidate_range_start(self, rng: MmuNotifierRange) -> Steps:
        """Mirrors ``kvm_mmu_notifier_invalidate_range_start()``."""
        kvm = self.kvm
        kvm.mn_active_invalidate_count += 1
        kvm.gpc_invalidate_start(rng.start, rng.end)
        slots = kvm.slots_for_hva(rng.start, rng.end)
        if not slots:
            return
        yield from kvm.mmu_lock.write_lock.steps()
        kvm.mmu_invalidate_begin()
        flush = False
        for slot in slots:
            g0, g1 = kvm.hva_range_to_gfns(slot, rng.start, rng.end)
            kvm.mmu_invalidate_range_add(g0, g1)
            flush |= kvm.arch.unmap_gfn_range(slot, g0, g1, reason=rng.reason or rng.event.value)
        if flush:
            kvm.flush_remote_tlbs("invalidate_range_start")
        kvm.mmu_lock.write_unlock()
        yield f"kvm_mmu_notifier_invalidate_range_start: SPTEs zapped ({rng.reason or rng.event.value})"

    @kpath
    def invalidate_range_end(self, rng: MmuNotifierRange) -> Steps:
        """Mirrors ``kvm_mmu_notifier_invalidate_range_end()``."""
        kvm = self.kvm
        if kvm.slots_for_hva(rng.start, rng.end):
            yield from kvm.mmu_lock.write_lock.steps()
            kvm.mmu_invalidate_end()
            kvm.mmu_lock.write_unlock()
        kvm.mn_active_invalidate_count -= 1
        yield "kvm_mmu_notifier_invalidate_range_end: mmu_invalidate_seq bumped"

    def _age(self, start: int, end: int, fn: str, flush: bool) -> bool:
        kvm = self.kvm
        young = False
        slots = kvm.slots_for_hva(start, end)
        if not slots:
            return False
        kvm.mmu_lock.write_lock()
        try:
            for slot in slots:
                g0, g1 = kvm.hva_range_to_gfns(slot, start, end)
                if fn == "test":
                    young |= kvm.arch.test_age_gfn(slot, g0, g1)
                else:
                    young |= kvm.arch.age_gfn(slot, g0, g1)
        finally:
            kvm.mmu_lock.write_unlock()
        if young and flush and kvm.arch.flush_on_age():
            kvm.flush_remote_tlbs("clear_flush_young")
        return young

    def clear_flush_young(self, start: int, end: int) -> bool:
        return self._age(start, end, "clear", flush=True)

    def clear_young(self, start: int, end: int) -> bool:
        return self._age(start, end, "clear", flush=False)

    def test_young(self, addr: int) -> bool:
        return self._age(addr, addr + 4096, "test", flush=False)

    def release(self) -> None:
        """``kvm_mmu_notifier_release()`` → ``kvm_flush_shadow_all()``."""
        kvm = self.kvm
        kvm.mmu_lock.write_lock()
        kvm.arch.flush_shadow_all()
        kvm.mmu_lock.write_unlock()


class Kvm:
    """Model of ``struct kvm``."""

    def __init__(self, host, *, policy: str | Policy = DEFAULT_POLICY, arch: str = "x86", mmu: str = "tdp",
                 allow_unsafe_mappings: bool = False, v613_other: bool | None = None, pml: bool = True,
                 ad_enabled: bool = True, eager_split: bool = True, has_private_mem: bool = True,
                 execution: str = "hardware", **arch_opts):
        if execution not in ("hardware", "emulated"):
            raise ModelError(errno.EINVAL, f"execution must be hardware or emulated, not {execution!r}")
        self.execution = execution
        self.host = host
        self.mm = host.mm
        self.phys = host.phys
        self.journal = host.journal
        self.policy: Policy = get_policy(policy) if isinstance(policy, str) else policy
        self.allow_unsafe_mappings = allow_unsafe_mappings      # kvm.allow_unsafe_mappings (0444)
        #: The other 6.13 MMU changes (not the series): the policy's choice (``ops.mmu_613_other``) unless
        #: given; ``False`` with the series policy is "series only", the 85 patches on a v6.12 base.
        self.v613_other = bool(v613_other)
        self.has_private_mem = has_private_mem
        self.mem_attr_array: dict[int, int] = {}   # gfn → KVM_MEMORY_ATTRIBUTE_* (kvmsim.kvm.memory_attributes)
        self.nr_memslot_as_ids = 1
        self.memslots = [KvmMemslots() for _ in range(self.nr_memslot_as_ids)]
        self.sched: Scheduler = host.sched          # the world's scheduler (one per host)
        self.mmu_lock = MmuLock(sched=self.sched)
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = -1
        self.mmu_invalidate_range_end = -1
        self.mn_active_invalidate_count = 0
        self.host_refs: dict = {}            # ghost: (pfn, Hold) → count of references KVM holds
        self.page_refs_out: dict[int, int] = {}   # pages handed out by gfn_to_page, not yet released
        self.gpcs: list = []
        self.host_maps: list = []
        self.vcpus: list = []
        self.dirty_ring_size = 0
        self.dirty_ring_with_bitmap = False        # KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (kvm.dirty)
        self.manual_dirty_log_protect = 0
        self.destroyed = False
        self.mutations = None               # a record of kvmsim.explore.mutations.install(); never read here
        self.notifier = KvmMmuNotifier(self)
        self.mm.register_notifier(self.notifier)
        from kvmsim.kvm.arch import make_arch
        self.arch = make_arch(self, arch, mmu=mmu, pml=pml, ad_enabled=ad_enabled, eager_split=eager_split,
                              **arch_opts)
        from kvmsim.policies import resolve
        #: The policy resolved for this arch, once (:class:`kvmsim.policies.KvmOps`).
        self.ops = resolve(self.policy, self.arch.family)
        if v613_other is None:
            self.v613_other = self.ops.mmu_613_other

    # ---- lookups ------------------------------------------------------------------------------
    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> KvmMemorySlot | None:
        return self.memslots[as_id].gfn_to_memslot(gfn)

    def slots_for_hva(self, start: int, end: int) -> list[KvmMemorySlot]:
        out = []
        for slots in self.memslots:
            out.extend(slots.by_hva(start, end))
        return out

    @staticmethod
    def hva_range_to_gfns(slot: KvmMemorySlot, start: int, end: int) -> tuple[int, int]:
        s = max(start, slot.userspace_addr)
        e = min(end, slot.hva_end)
        return slot.hva_to_gfn(s), slot.hva_to_gfn(e + 4095)

    # ---- invalidation tracking -------------------------------------------------------------------
    def mmu_invalidate_begin(self) -> None:
        """``kvm_mmu_invalidate_begin()``."""
        self.mmu_invalidate_in_progress += 1
        if self.mmu_invalidate_in_progress == 1:
            self.mmu_invalidate_range_start = -1
            self.mmu_invalidate_range_end = -1

    def mmu_invalidate_range_add(self, start: int, end: int) -> None:
        """``kvm_mmu_invalidate_range_add()``: the union of concurrent ranges."""
        if self.mmu_invalidate_range_start < 0:
            self.mmu_invalidate_range_start, self.mmu_invalidate_range_end = start, end
        else:
            self.mmu_invalidate_range_start = min(self.mmu_invalidate_range_start, start)
            self.mmu_invalidate_range_end = max(self.mmu_invalidate_range_end, end)

    def mmu_invalidate_end(self) -> None:
        """``kvm_mmu_invalidate_end()``: seq++ then in_progress--."""
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1
        if self.mmu_invalidate_in_progress < 0:
            raise KvmBug("mmu_invalidate_in_progress went negative")

    def mmu_invalidate_retry(self, mmu_seq: int) -> bool:
        return self.mmu_invalidate_in_progress > 0 or self.mmu_invalidate_seq != mmu_seq

    def mmu_invalidate_retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """``mmu_invalidate_retry_gfn()``: requires mmu_lock."""
        self.lockdep_assert_held_mmu_lock("mmu_invalidate_retry_gfn")
        if self.mmu_invalidate_in_progress and self.mmu_invalidate_range_start <= gfn < self.mmu_invalidate_range_end:
            return True
        return self.mmu_invalidate_seq != mmu_seq

    def mmu_invalidate_retry_gfns(self, mmu_seq: int, gfns):
        """:meth:`mmu_invalidate_retry_gfn` over an array of gfns (the x86 bulk fault's locked
        ``is_page_fault_stale()``): a bool array."""
        import numpy as np
        if self.mmu_invalidate_seq != mmu_seq:
            return np.ones(len(gfns), dtype=bool)
        if self.mmu_invalidate_in_progress:
            return (gfns >= self.mmu_invalidate_range_start) & (gfns < self.mmu_invalidate_range_end)
        return np.zeros(len(gfns), dtype=bool)

    def mmu_invalidate_retry_gfn_unsafe(self, mmu_seq: int, gfn: int) -> bool:
        """Lockless pre-check; may be wrong either way, must be followed by the locked check."""
        if self.mmu_invalidate_in_progress and self.mmu_invalidate_range_start <= gfn < self.mmu_invalidate_range_end:
            return True
        return self.mmu_invalidate_seq != mmu_seq

    def lockdep_assert_held_mmu_lock(self, where: str) -> None:
        if not self.mmu_lock.held():
            self.journal.fact("lockdep", caller=where, kvm=True, detail="mmu_lock not held")
            self.journal.count("lockdep_warnings")

    def flush_remote_tlbs(self, why: str, n: int = 1) -> None:
        self.journal.count("tlb_flush", n)
        self.journal.count(f"tlb_flush:{why}", n)

    # ---- memslots ------------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                               flags: int = 0, *, v1: bool = False, guest_memfd=None,
                               guest_memfd_offset: int = 0) -> KvmMrChange | None:
        """``KVM_SET_USER_MEMORY_REGION(2)``: raises ``ModelError`` with the kernel's errno."""
        if self.destroyed:
            raise ModelError(errno.EBADF, "KVM_SET_USER_MEMORY_REGION: the VM was destroyed (its fd is closed)")
        mem = KvmUserspaceMemoryRegion2(slot, int(flags), guest_phys_addr, memory_size, userspace_addr,
                                        guest_memfd_offset)
        change, old = validate_region(self, mem, v1)
        if change is None:
            return None
        new = None if change == KvmMrChange.DELETE else new_memslot(mem, old, change)
        if new is not None and change == KvmMrChange.CREATE and int(flags) & KVM_MEM.GUEST_MEMFD:
            from kvmsim.kvm.gmem import kvm_gmem_bind
            kvm_gmem_bind(self, new, guest_memfd, guest_memfd_offset)
        try:
            kvm_prepare_memory_region(self, old, new, change)    # raises before anything is committed
        except ModelError:
            if new is not None and new.gmem_file is not None and change == KvmMrChange.CREATE:
                from kvmsim.kvm.gmem import kvm_gmem_unbind
                kvm_gmem_unbind(new)                              # __kvm_set_memory_region(): out_unbind
            raise
        self.journal.count(f"memslot_{change.value}")
        if change == KvmMrChange.DELETE:
            self._delete_slot(old)
        elif change == KvmMrChange.CREATE:
            self.memslots[new.as_id].install(new)
            self.arch.slot_apply_flags(None, new, change)
        elif change == KvmMrChange.MOVE:
            old.flags |= KVM_MEM.INVALID
            self.mmu_lock.write_lock()
            self.arch.flush_shadow_memslot(old)
            self.mmu_lock.write_unlock()
            old.flags &= ~KVM_MEM.INVALID
            self.memslots[old.as_id].remove(old.id)
            old.base_gfn = new.base_gfn
            old.flags = new.flags
            old.dirty_bitmap = new.dirty_bitmap               # the old bitmap when logging stays on
            self.memslots[old.as_id].install(old)
        else:
            before = KvmMemorySlot(old.id, old.as_id, old.base_gfn, old.npages, old.userspace_addr, old.flags)
            old.flags = new.flags
            old.dirty_bitmap = new.dirty_bitmap
            self.memslots[old.as_id].generation += 2
            self.arch.slot_apply_flags(before, old, change)
        return change

    def _delete_slot(self, old: KvmMemorySlot) -> None:
        old.flags |= KVM_MEM.INVALID
        self.mmu_lock.write_lock()
        self.arch.flush_shadow_memslot(old)
        self.mmu_lock.write_unlock()
        self.memslots[old.as_id].remove(old.id)
        self.gpc_invalidate_start(old.userspace_addr, old.hva_end)
        if old.gmem_file is not None:
            from kvmsim.kvm.gmem import kvm_gmem_unbind
            kvm_gmem_unbind(old)                                 # kvm_free_memslot()

    # ---- pfncache hook ---------------------------------------------------------------------------
    def gpc_invalidate_start(self, start: int, end: int) -> None:
        for gpc in self.gpcs:
            gpc.invalidate(start, end)

    # ---- vCPUs and teardown ------------------------------------------------------------------------
    def create_vcpu(self):
        from kvmsim.kvm.vcpu import KvmVcpu
        vcpu = KvmVcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def destroy(self) -> None:
        """``kvm_destroy_vm()``: unmap vcpu maps, zap everything, unregister the notifier."""
        if self.destroyed:
            return
        for m in list(self.host_maps):
            from kvmsim.kvm.host_map import kvm_vcpu_unmap
            kvm_vcpu_unmap(m.vcpu, m)
        for gpc in list(self.gpcs):
            gpc.deactivate()
        self.mm.unregister_notifier(self.notifier)
        self.mmu_lock.write_lock()
        self.arch.flush_shadow_all()
        self.mmu_lock.write_unlock()
        for slots in self.memslots:
            for s in list(slots):
                slots.remove(s.id)
        self.destroyed = True
