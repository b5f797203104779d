"""Real /dev/kvm: capabilities, binary stats, policy, resource safety (close, failure, GC, signals) and the
host-settings guard."""

from __future__ import annotations

import gc
import os
import signal
import threading

import pytest

from kvmsim.backend.base import (
    Backend, Exit, GuestMemfdFlags, KVM_MEM, MappingKind, MemoryRegion, VmOptions, page_gpas,
)
from kvmsim.backend.kvm import KvmBackend
from kvmsim.backend.kvm.settings import host_settings, read_host_settings
from kvmsim.errors import BackendError
from kvmsim.types import Gpa

pytestmark = pytest.mark.kvm

G = 1 << 30


def test_capabilities_report_this_host(kvm):
    c = kvm.capabilities()
    assert c["api_version"] == 12 and c["vcpu_mmap_size"] >= 3 * 4096
    assert c["nr_memslots"] > 32 and c["user_memory2"] == 1 and c["readonly_mem"] == 1
    assert c["manual_dirty_log_protect2"] & 3 == 3              # ENABLE | INITIALLY_SET
    assert c["dirty_log_ring"] >= 4096 * 16
    assert c["guest_memfd_flags"] & 3 == 3                      # MMAP | INIT_SHARED
    assert c["policy"] in ("legacy", "series") and c["kernel_release"] == os.uname().release
    assert {"hugepages_2m_free", "thp_enabled", "thp_shmem_enabled"} <= c.keys()


def test_policy_follows_release_unless_overridden():
    with KvmBackend() as b:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
        assert b.policy == ("series" if (major, minor) >= (6, 13) else "legacy")
    with KvmBackend(policy="legacy") as b:
        assert b.policy == "legacy" and b.capabilities()["policy"] == "legacy"


def test_kvm_backend_satisfies_the_protocol(kvm):
    assert isinstance(kvm, Backend) and kvm.name == "kvm"


def test_binary_stats(kvm):
    m = kvm.host_mmap(MappingKind.ANON_SHARED, 1 << 20).mapping
    kvm.set_memory_region(MemoryRegion(1, Gpa(G), m.size, m.hva))
    before = kvm.stats()
    assert {"pages_4k", "mmu_pte_write", "vcpu.insn_emulation", "vcpu.exits"} <= before.keys()
    kvm.guest_write(page_gpas(G, 100), 1)
    after = kvm.stats()
    emulated = after["vcpu.insn_emulation"] - before["vcpu.insn_emulation"]
    if emulated:            # an emulating host (kvm_pvm): every guest store is a tracked pte write
        assert emulated >= 100 * 6
        assert after["mmu_pte_write"] - before["mmu_pte_write"] >= 100
        assert after["pages_4k"] == 0


def _resources() -> tuple[int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return fds, maps


def _busy(b: KvmBackend) -> None:
    b.create_vm(VmOptions(dirty_ring_entries=4096))
    for kind in (MappingKind.ANON_PRIVATE, MappingKind.ANON_SHARED, MappingKind.MEMFD, MappingKind.THP_ANON,
                 MappingKind.PERF_RING, MappingKind.IO_URING_RING):
        assert b.host_mmap(kind, 4 * 4096 if kind is not MappingKind.THP_ANON else 2 << 20).errno == 0
    g = b.create_guest_memfd(1 << 20, GuestMemfdFlags(3)).gmem
    gm = b.host_mmap(MappingKind.GUEST_MEMFD, 1 << 20, gmem=g).mapping
    b.set_memory_region(MemoryRegion(1, Gpa(G), gm.size, gm.hva, KVM_MEM.GUEST_MEMFD, g))
    b.guest_write([G], 1)
    b.stats()
    b.host_fork()


def test_close_releases_every_fd_mapping_and_child():
    gc.collect()
    start = _resources()
    with KvmBackend() as b:
        _busy(b)
        assert _resources() != start
        children = [c.pid for c in b.host.children]
    assert _resources() == start
    for pid in children:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)                          # reaped


def test_failure_and_garbage_collection_release_resources():
    gc.collect()
    start = _resources()
    with pytest.raises(RuntimeError):
        with KvmBackend() as b:
            _busy(b)
            raise RuntimeError("boom")
    assert _resources() == start
    b = KvmBackend()
    _busy(b)
    del b
    gc.collect()
    assert _resources() == start


class _Interrupted(Exception):
    pass


def test_a_signal_during_kvm_run_leaves_the_backend_usable(kvm):
    m = kvm.host_mmap(MappingKind.ANON_SHARED, 16 * 4096).mapping
    kvm.set_memory_region(MemoryRegion(1, Gpa(G), m.size, m.hva))
    kvm.guest_write([G], 0x5A)

    def handler(signum, frame):
        raise _Interrupted()
    old = signal.signal(signal.SIGUSR1, handler)
    main = threading.get_ident()
    timer = threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGUSR1))
    try:
        timer.start()
        try:
            kvm.guest_read([G] * 200_000)                        # ~1 s when every insn is emulated
            interrupted = False
        except _Interrupted:
            interrupted = True
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, old)
    if not interrupted:
        pytest.skip("the guest finished before the signal arrived (not an emulating host)")
    # the interrupted program is completed (immediate_exit) before the next one starts
    out = kvm.guest_read(page_gpas(G, 3))
    assert out.complete and out.values == [0x5A, 0, 0]
    assert kvm.guest_write([G + 4096], 7).exits == [Exit.OK]
    assert kvm.host_read(m, 4096).data == (7).to_bytes(8, "little")


def test_host_settings_are_restored_after_failure():
    before = read_host_settings()
    if not os.access("/proc/sys/vm/nr_hugepages", os.W_OK):
        pytest.skip("nr_hugepages is not writable here")
    with pytest.raises(RuntimeError):
        with host_settings(nr_hugepages=int(before["nr_hugepages"]) + 1) as inside:
            assert inside["nr_hugepages"] == str(int(before["nr_hugepages"]) + 1)
            raise RuntimeError("boom")
    assert read_host_settings() == before
    with host_settings() as inside:                              # nothing requested: nothing written
        assert inside == before
    with pytest.raises(BackendError, match="cannot set"):
        with host_settings(thp_enabled="no-such-mode"):
            pass
    assert read_host_settings() == before


def test_a_live_fork_child_does_not_keep_the_vm_alive():
    from kvmsim.backend.kvm.dmesg import DmesgWatch

    watch = DmesgWatch()
    with KvmBackend() as b:
        b.create_vm(VmOptions(dirty_ring_entries=4096))
        child = b.host_fork()
        b.create_vm()                     # the old VM must be gone, or its fd number's debugfs dir clashes
        b.create_vm()
        child.release()
    assert not [line for line in watch.new_lines() if "duplicate directory" in line]


def test_guest_exception_is_a_terminal_exit(kvm):
    from kvmsim.backend.kvm import guest

    m = kvm.host_mmap(MappingKind.ANON_SHARED, 1 << 20).mapping
    kvm.set_memory_region(MemoryRegion(1, Gpa(G), m.size, m.hva))
    kvm.guest_write([G + 8], 3)
    pd = kvm.vm._pds[1]
    kvm.vm._poke(pd, bytes(8))                                   # unmap the guest's first 2 MiB of GiB 1
    out = kvm.guest_read([G + (4 << 20), G + 8, G + 16])
    assert out.exits == [Exit.MMIO, Exit.EXCEPTION] and not out.complete
    assert "vector 14" in out.detail and f"cr2={G + 8:#x}" in out.detail
    kvm.vm._poke(pd, guest.pde_2m(G).to_bytes(8, "little"))
    assert kvm.guest_read([G + 8, G + 16]).values == [3, 0]        # the vCPU is set up afresh
