"""The generic changes around the nested map users: patch 33 "KVM: Pass in write/dirty to kvm_vcpu_map(),
not kvm_vcpu_unmap()" (the dirty decision at map time) and patch 29 "KVM: pfncache: Precisely track
refcounted pages" (the gfn->pfn cache's retry releases its discarded page unused)."""

from __future__ import annotations

import pathlib

import pytest

from kvmsim.kvm.dirty import kvm_get_dirty_log
from kvmsim.kvm.host_map import kvm_vcpu_map, kvm_vcpu_unmap
from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host
from kvmsim.mm.vma import VmaKind
from kvmsim.scenarios import load_scenario
from kvmsim.scenarios.runner import run
from kvmsim.uapi import KVM_MEM

PAGE = 4096
LIBRARY = pathlib.Path(__file__).resolve().parents[2] / "src" / "kvmsim" / "scenarios" / "library"


def vm(policy: str):
    host = Host()
    kvm = Kvm(host, policy=policy, arch="x86")
    ram = host.mm.mmap(4 * PAGE, VmaKind.ANON)
    for i in range(4):
        host.mm.host_access(ram.start + i * PAGE, True, i)
    kvm.set_user_memory_region(0, 0, 4 * PAGE, ram.start, KVM_MEM.LOG_DIRTY_PAGES)
    return kvm, kvm.create_vcpu()


@pytest.mark.parametrize("policy, logged", [("legacy", {2}), ("series", {1})])
def test_dirty_is_decided_at_map_time_in_the_series(policy, logged):
    """gfn 1: a writable map unmapped with ``dirty=false`` (v6.12 nVMX's APIC-access page); gfn 2: a
    read-only map unmapped with ``dirty=true``.  v6.12 follows the unmap's word, v6.13 the map's."""
    kvm, vcpu = vm(policy)
    kvm_get_dirty_log(kvm, 0)
    kvm_vcpu_unmap(vcpu, kvm_vcpu_map(vcpu, 1, True), False)
    kvm_vcpu_unmap(vcpu, kvm_vcpu_map(vcpu, 2, False), True)
    assert {int(g) for g in kvm_get_dirty_log(kvm, 0).nonzero()[0]} == logged


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_pfncache_retry_releases_the_discarded_page(policy):
    sc = load_scenario(LIBRARY / "pfncache-refresh-retry-unused.toml")
    r = run(sc, policy)
    assert r.expected_match, r.mismatches
    race = next(s for s in r.steps if s.op == "interleave")
    assert race.counters.get("gpc_refresh_retry", 0) >= 1
    marks = race.counters.get("mark_accessed:hva_to_pfn_retry", 0)
    if policy == "legacy":                # every discarded page and the kept one
        assert marks == race.counters["gpc_refresh_retry"] + 1 and set(r.by_invariant()) == {"INV-7"}
    else:                                 # only the kept one
        assert marks == 1 and r.violations == []
