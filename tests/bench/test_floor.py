"""The memory floor of the dirty-log flow (kvmsim.bench.floor): the per-phase table of what each phase
must write agrees with what the model's phases change, and the floors land in the run's result."""

import numpy as np
import pytest

from kvmsim.bench.dirty_log_perf import Options, run_model
from kvmsim.bench.floor import MEM_MAP_FIELDS, PHASE_ACCESS, floor_applies, phase_key, state_bytes

MiB = 1 << 20


def _arrays(kvm) -> dict[str, np.ndarray | None]:
    """Every per-page array of the test slot, by the floor table's names."""
    slot = kvm.memslots[0].by_id[1]
    vma = kvm.mm.vma_lookup(slot.userspace_addr)
    t = slot.arch.get("x86")
    out = {f"mem_map.{f}": getattr(kvm.phys, f) for f in MEM_MAP_FIELDS}
    out.update({"pte.pfn": vma.pte_pfn, "pte.flags": vma.pte, "pte.level": vma.pte_level,
                "dirty_bitmap": slot.dirty_bitmap})
    if t is not None:
        out.update({"spte.pfn": t.pfn, "spte.bits": t.bits, "spte.level": t.level})
    return out


#: Writes the table counts that leave the model's arrays as they were: populate stores 0 over a
#: zeroed frame; KVM_GET_DIRTY_LOG writes userspace's copy, not the slot's bitmap.
_SAME_VALUE = {"populate": {"mem_map.data"}, "get": {"dirty_bitmap"}}


@pytest.mark.parametrize("policy", ["legacy", "series"])
def test_each_phase_changes_exactly_the_state_its_floor_writes(policy):
    before: dict[str, np.ndarray | None] = {}
    changed: dict[str, set[str]] = {}

    def on_phase(kvm, name, iteration, ended):
        now = {k: (None if a is None else a.copy()) for k, a in _arrays(kvm).items()}
        if not ended:
            before.clear()
            before.update(now)
            return
        diff = {k for k, a in now.items() if (before.get(k) is None) != (a is None) or
                (a is not None and not np.array_equal(before[k], a))}
        changed.setdefault(phase_key(name, iteration), diff)     # the first of each kind

    opts = Options(vcpu_memory=16 * MiB, iterations=3)
    assert floor_applies(opts)
    run_model(opts, policy, on_phase=on_phase)
    assert set(changed) == {"populate", "enable", "dirty1", "dirty", "get", "clear", "disable"}
    for key, acc in PHASE_ACCESS.items():
        writes = {n for n, _ in acc.writes}
        if key == "clear" and policy == "legacy":
            writes |= {"mem_map.flags"}                  # kvm_set_pfn_dirty() on each cleared SPTE
        if key == "disable":
            writes |= {"dirty_bitmap"}                   # freed: no memory traffic
        assert changed[key] == writes - _SAME_VALUE.get(key, set()), key


def test_floors_are_in_the_result_and_scale_with_the_state():
    opts = Options(vcpu_memory=16 * MiB, floor=True)
    r = run_model(opts, "legacy", bandwidth=1e10)
    npages = opts.total >> 12
    assert r.copy_bandwidth == 1e10
    assert r.state_bytes["spte.bits"] == 2 and r.state_bytes["dirty_bitmap"] == 1
    dirty1 = r.phase("dirty", 1)
    assert dirty1.floor_bytes == (2 + 8 + 8) * npages              # SPTE bits and pfn read, data stored
    assert dirty1.floor_seconds == pytest.approx(dirty1.floor_bytes / 1e10)
    clear = r.phase("clear", 1)
    assert clear.summary()["set_dirty"] == npages                  # legacy: one per cleared SPTE
    assert clear.floor_bytes == (1 + 1 + 1 + 1 + 2 + 2) * npages + (8 + 8 + 2 + 2) * npages
    assert r.floor_multiple() == pytest.approx(sum(p.seconds for p in r.phases) / r.floor_seconds())
    assert r.to_json()["phases"][0]["floor_multiple"] == pytest.approx(r.phases[0].floor_multiple)


def test_no_floor_for_a_flow_the_table_does_not_describe():
    r = run_model(Options(vcpu_memory=16 * MiB, write_percent=50, floor=True), "series", bandwidth=1e10)
    assert r.floor_seconds() is None and all(p.floor_bytes is None for p in r.phases)
    assert r.state_bytes                                           # the state is still reported


def test_state_bytes_follow_the_arrays_dtypes():
    seen = {}
    run_model(Options(vcpu_memory=4 * MiB), "series",
              on_phase=lambda kvm, name, it, ended: seen.setdefault("s", state_bytes(
                  kvm, kvm.memslots[0].by_id[1], kvm.mm.vma_lookup(kvm.memslots[0].by_id[1].userspace_addr)))
              if name == "dirty" and not ended else None)
    s = seen["s"]
    assert s["mem_map.data"] == 8 and s["pte.flags"] == 1 and s["spte.level"] == 1
    assert sum(s.values()) == 62
