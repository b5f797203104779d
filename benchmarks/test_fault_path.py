"""Single-page stage-2 faults through the scalar path (``X86Mmu.page_fault``), one call per page.

Target (issue 17): >= 100,000 faults/s on pages the host already maps (GUP-fast succeeds).  Also
measured: the first-touch fault, whose GUP slow path runs the host page fault, and the vectorised
populate.  The rates are CPU time of this process (``time.process_time()``, as
``compare_commits.py`` measures): the development machines are shared, and under load the wall
clock counts other processes' time too."""

import time

import pytest

from kvmsim.bench.memstress import create_test_slots
from kvmsim.bench.prefault import host_prefault_range
from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host

NPAGES = 1 << 14


def _vm(policy, prefault):
    host = Host(recording=False)
    kvm = Kvm(host, policy=policy, arch="x86")
    (ts,) = create_test_slots(kvm, NPAGES << 12, "anonymous", 1)
    if prefault:
        host_prefault_range(kvm, kvm.memslots[0].by_id[ts.slot], 0, NPAGES)
    return kvm, kvm.create_vcpu(), ts.gpa


@pytest.mark.parametrize("policy", ["legacy", "series"])
@pytest.mark.parametrize("host", ["host-mapped", "first-touch"])
def test_scalar_faults_per_second(benchmark, record, policy, host):
    rates = []

    def setup():
        return _vm(policy, host == "host-mapped"), {}

    def faults(kvm, v, gpa):
        pf = kvm.arch.page_fault
        t = time.process_time()
        for k in range(NPAGES):
            pf(v, gpa + (k << 12), True)
        rates.append(NPAGES / (time.process_time() - t))
        assert kvm.journal.counters["page_fault"] == NPAGES

    benchmark.pedantic(faults, setup=setup, rounds=7, iterations=1)     # best of 7: the machine is noisy
    record(faults_per_second=round(max(rates)), pages=NPAGES)


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_bulk_populate_pages_per_second(benchmark, record, policy):
    rates = []

    def setup():
        return _vm(policy, False), {}

    def populate(kvm, v, gpa):
        from kvmsim.bench.memstress import vcpu_pass
        t = time.process_time()
        vcpu_pass(kvm, v, gpa, NPAGES, None, 1)
        rates.append(NPAGES / (time.process_time() - t))

    benchmark.pedantic(populate, setup=setup, rounds=3, iterations=1)
    record(pages_per_second=round(max(rates)), pages=NPAGES)
