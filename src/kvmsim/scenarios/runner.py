"""Run a scenario under one policy on a fresh Host and VM, check every step, compare with its claims.

Per step: the op's result and errno, the counter deltas, the journal facts it produced (for
``--trace``) and the invariant violations the checker found after it.  A ``ModelError`` raised by
an op is that step's result (the kernel returned an errno), never a crash.  Steps are numbered
from 1; ``host.journal.step`` carries the number so facts and violations name their step.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from kvmsim.errors import KvmsimError, ModelError, errno_name
from kvmsim.scenarios.ops import Env, Res, guarded, make_gen
from kvmsim.scenarios.spec import FinalExpect, Scenario, Step

#: Counters the compare table shows (when non-zero), in this order.
KEY_COUNTERS = ("kvm_get", "kvm_put", "kvm_pin", "kvm_unpin", "kvm_set_dirty", "kvm_mark_accessed",
                "spte_write", "spte_zap", "fault_retry", "guest_livelock")


@dataclass
class StepResult:
    index: int
    op: str
    text: str
    res: Res
    counters: dict[str, int]
    violations: list
    facts: list
    mismatches: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        value = self.res.value
        if not isinstance(value, (int, str, type(None))) or isinstance(value, bool):
            value = None
        return {"op": self.op, "result": self.res.result, "errno": self.res.errno_name, "value": value}


@dataclass
class RunResult:
    scenario: str
    policy: str
    verdict: str                       # clean | violations | error
    violations: list
    steps: list[StepResult]
    counters: dict[str, int]
    expected_match: bool
    mismatches: list[str]
    error: str | None = None
    stated: bool = True                 # the scenario states an outcome for this policy

    def by_invariant(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.violations:
            out[v.invariant] = out.get(v.invariant, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: int(kv[0].split("-")[1])))

    def as_dict(self) -> dict:
        return {"scenario": self.scenario, "policy": self.policy, "verdict": self.verdict,
                "violations": [_violation_dict(v) for v in self.violations],
                "steps": [s.as_dict() for s in self.steps],
                "counters": dict(sorted(self.counters.items())), "expected_match": self.expected_match}


def _violation_dict(v) -> dict:
    return {"invariant": v.invariant, "step": v.step, "pfn": v.pfn, "gfn": v.gfn, "detail": v.detail}


# ---- requirements --------------------------------------------------------------------------------------

def missing_requirement(sc: Scenario) -> str | None:
    """Why this scenario cannot run meaningfully here, or None."""
    for req in sc.requires:
        if req == "x86_mmu":
            try:
                mod = importlib.import_module("kvmsim.x86")
            except ImportError:
                mod = None
            if mod is None or not hasattr(mod, "make_x86_mmu"):
                return "needs the x86 MMU (kvmsim.x86.make_x86_mmu), which is not there yet"
        else:
            return f"unknown requirement {req!r}"
    return None


# ---- set-up ------------------------------------------------------------------------------------------

def build(sc: Scenario, policy: str) -> Env:
    """A fresh Host with the scenario's drivers and VMAs, and a VM with its capabilities and memslots."""
    from kvmsim.kvm.dirty import enable_dirty_ring, enable_manual_protect
    from kvmsim.kvm.kvm import Kvm
    from kvmsim.uapi import KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    from kvmsim.mm.host import Host
    from kvmsim.mm.vma import VmaKind
    from kvmsim.scenarios.ops import _flags

    host = Host()
    if sc.host.kernel != "6.13":
        from kvmsim.mm.huge_memory import set_host_kernel
        set_host_kernel(host.mm, tuple(int(x) for x in sc.host.kernel.split(".")))
    host.mm.thp_use_zero_page = sc.host.thp_zero_page
    if not sc.host.swap:
        host.mm.total_swap_pages = 0
    vma_size = {}
    for v in sc.vmas:
        if v.driver:
            vma_size.setdefault(v.driver, v.size)
    for d in sc.drivers:
        size = d.size if d.size is not None else vma_size.get(d.name, 4096)
        host.add_driver(d.name, max(1, size >> 12), d.pfn_class, order=d.order, compound=d.compound,
                        prefault=d.prefault, pte_write=d.pte_write, mixed=d.mixed, free_rule=d.free_rule,
                        cacheable=d.cacheable)
    vmas: dict[str, dict] = {}
    for v in sc.vmas:
        prot = "" if v.prot == "none" else v.prot
        vma = host.mm.mmap(v.size, VmaKind(v.kind), prot=prot, page_size=v.page_size, thp=v.thp,
                           driver=host.drivers[v.driver] if v.driver else None, io=v.io)
        if v.writenotify is not None:
            vma.writenotify = v.writenotify
        vmas[v.name] = {"start": vma.start, "size": v.size, "mapping": vma.mapping, "kind": v.kind,
                        "pgoff": vma.pgoff if vma.mapping is not None else 0}
    vm = sc.vm
    arch_opts = {"host_bits": int(vm.ppc_pr_host[:2])} if vm.arch == "ppc-book3s-pr" else {}
    if vm.paging != "direct":
        arch_opts["paging"] = vm.paging
    if vm.arch == "x86":
        arch_opts.update(slot_zap_all=vm.slot_zap_all, nx_huge_pages=vm.nx_huge_pages, maxphyaddr=vm.maxphyaddr)
    arch_opts.update({"arm64": {"ipa_bits": vm.ipa_bits, "cacheable_pfnmap_supported": vm.cacheable_pfnmap_supported},
                      "loongarch": {"cpu_vabits": vm.cpu_vabits},
                      "riscv": {"gstage_pgd_levels": vm.gstage_pgd_levels}}.get(vm.arch, {}))
    kvm = Kvm(host, policy=policy, arch=vm.arch, mmu=vm.mmu, pml=vm.pml, v613_other=vm.v613_other,
              allow_unsafe_mappings=vm.allow_unsafe_mappings, execution=vm.execution, ad_enabled=vm.ad_enabled,
              eager_split=vm.eager_split, **arch_opts)
    if vm.mutations:
        from kvmsim.explore.mutations import Mutations, install
        install(kvm, Mutations.parse(vm.mutations))
    if vm.dirty_ring:
        enable_dirty_ring(kvm, vm.dirty_ring)
    if vm.dirty_ring_with_bitmap:
        from kvmsim.kvm.dirty import enable_dirty_ring_with_bitmap
        enable_dirty_ring_with_bitmap(kvm)
    if vm.manual_protect:
        enable_manual_protect(kvm, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                              | (KVM_DIRTY_LOG_INITIALLY_SET if vm.initially_set else 0))
    if vm.mte:
        from kvmsim.arm64.mte import kvm_vm_ioctl_enable_cap_mte
        kvm_vm_ioctl_enable_cap_mte(kvm)
    for _ in range(vm.vcpus):
        kvm.create_vcpu().apf_enabled = vm.async_pf
    from kvmsim.kvm.gmem import GuestMemfd
    from kvmsim.uapi import KVM_MEM
    gmems = {g.name: GuestMemfd(kvm, g.size, g.flags) for g in sc.guest_memfds}
    for s in sc.memslots:
        g = gmems.get(s.guest_memfd) if s.guest_memfd is not None else None
        kvm.set_user_memory_region(s.id, s.gpa, s.size, vmas[s.vma]["start"] + s.offset,
                                   _flags(s.flags) | (int(KVM_MEM.GUEST_MEMFD) if g is not None else 0),
                                   guest_memfd=g, guest_memfd_offset=s.guest_memfd_offset)
    env = Env(host, kvm, vmas)
    env.gmems.update(gmems)             # the files gmem_* steps name (kvmsim.scenarios.ops_gmem)
    return env


# ---- expectations ---------------------------------------------------------------------------------------

def _bounds_ok(got: int, want: Any) -> bool:
    if isinstance(want, dict):
        return want.get("min", got) <= got <= want.get("max", got)
    return got == want


def _fmt(want: Any) -> str:
    if isinstance(want, dict):
        return " and ".join(f"{'≥' if k == 'min' else '≤'} {v}" for k, v in want.items())
    return f"= {want}"


def _check_violations(where: str, found: dict[str, int], want: dict[str, Any]) -> list[str]:
    out = []
    for inv, w in want.items():
        if not _bounds_ok(found.get(inv, 0), w):
            out.append(f"{where}: {inv} violations {found.get(inv, 0)}, expected {_fmt(w)}")
    for inv, n in found.items():
        if inv not in want:
            out.append(f"{where}: unexpected {inv} violation(s) ({n})")
    return out


def _check_counters(where: str, counters: dict[str, int], want: dict[str, Any]) -> list[str]:
    return [f"{where}: counter {name} = {counters.get(name, 0)}, expected {_fmt(w)}"
            for name, w in want.items() if not _bounds_ok(counters.get(name, 0), w)]


def _step_expectations(step: Step, policy: str) -> dict[str, Any]:
    want = dict(step.expect.get("*", {}))
    want.update(step.expect.get(policy, {}))
    return want


def check_step(sr: StepResult, step: Step, policy: str) -> list[str]:
    want = _step_expectations(step, policy)
    where = f"step {sr.index} ({step.op})"
    out = []
    for key in ("exit", "result"):
        if key in want:
            w = want[key]
            got: Any = sr.res.per_page if isinstance(w, list) else sr.res.result
            if got != w:
                out.append(f"{where}: {key} {got!r}, expected {w!r}")
    if "errno" in want:
        got_e = sr.res.errno_name or "0"
        if got_e.lower() != want["errno"].lower():
            out.append(f"{where}: errno {got_e}, expected {want['errno']}")
    if "value" in want and sr.res.value != want["value"]:
        out.append(f"{where}: value {sr.res.value!r}, expected {want['value']!r}")
    if "violations" in want:
        found: dict[str, int] = {}
        for v in sr.violations:
            found[v.invariant] = found.get(v.invariant, 0) + 1
        out += _check_violations(where, found, want["violations"])
    if "counters" in want:
        out += _check_counters(where, sr.counters, want["counters"])
    return out


def check_final(rr: RunResult, fe: FinalExpect) -> list[str]:
    where = f"[expect.{rr.policy}]"
    out = []
    if fe.verdict is not None and rr.verdict != fe.verdict:
        out.append(f"{where}: verdict {rr.verdict}, expected {fe.verdict}")
    if fe.violations is not None:
        out += _check_violations(where, rr.by_invariant(), fe.violations)
    out += _check_counters(where, rr.counters, fe.counters)
    return out


# ---- derived counters ---------------------------------------------------------------------------------

def _derived(facts) -> dict[str, int]:
    """Per-run counts of what KVM did to struct pages, from the journal facts."""
    out: dict[str, int] = {}
    names = {"get": "kvm_get", "put": "kvm_put", "pin": "kvm_pin", "unpin": "kvm_unpin",
             "set_dirty": "kvm_set_dirty", "mark_accessed": "kvm_mark_accessed"}
    for f in facts:
        if f.kvm and f.kind in names:
            out[names[f.kind]] = out.get(names[f.kind], 0) + 1
    return out


# ---- the run -----------------------------------------------------------------------------------------

def run(sc: Scenario, policy: str, *, progress=None, observe=None) -> RunResult:
    """Run ``sc`` under ``policy``; ``progress(i, n)`` is called after each step if given, and
    ``observe(env, i)`` after set-up (``i`` = 0) and after each step is checked (``--html`` snapshots)."""
    from kvmsim.check import Checker

    try:
        env = build(sc, policy)
    except (KvmsimError, ValueError) as e:
        return _finish(sc, policy, [], [], {}, error=f"set-up failed: {e}")
    except Exception as e:  # noqa: BLE001 -- the model broke on this set-up: report it as the run's error
        return _finish(sc, policy, [], [], {}, error=f"set-up failed: model raised {type(e).__name__}: {e}")
    host, kvm = env.host, env.kvm
    journal = host.journal
    checker = Checker(kvm)
    checker.run()                                   # set-up is not the scenario's fault
    checker.violations.clear()
    base = journal.snapshot()
    base_facts = len(journal.facts)
    if observe:
        observe(env, 0)
    results: list[StepResult] = []
    error = None
    for i, step in enumerate(sc.steps, 1):
        journal.step = i
        before = journal.snapshot()
        nfacts = len(journal.facts)
        try:
            res = host.sched.drive(guarded(make_gen(env, step.op, step.args)))
        except ModelError as e:                                # a KVM_BUG_ON in a scripted interleaving
            res = Res("error", e.errno, value=str(e))
        except Exception as e:                                 # the model itself broke: report, stop  # noqa: BLE001
            error = f"step {i} ({step.op}): model raised {type(e).__name__}: {e}"
            res = Res("crash", 0, value=str(e))
        facts = journal.facts[nfacts:]
        counters = journal.since(before)
        counters.update(_derived(facts))
        found = checker.run() if error is None else []
        sr = StepResult(i, step.op, step.describe(), res, counters, found, facts)
        sr.mismatches = check_step(sr, step, policy)
        results.append(sr)
        if observe:
            observe(env, i)
        if progress:
            progress(i, len(sc.steps))
        if error:
            break
    journal.step = None
    counters = journal.since(base)
    counters.update(_derived(journal.facts[base_facts:]))
    return _finish(sc, policy, results, checker.violations, counters, error=error)


def _finish(sc, policy, results, violations, counters, *, error=None) -> RunResult:
    verdict = "error" if error else ("violations" if violations else "clean")
    rr = RunResult(sc.name, policy, verdict, list(violations), results, counters, True, [], error,
                   stated=policy in sc.expect)
    mism = [m for s in results for m in s.mismatches]
    if policy in sc.expect:
        mism += check_final(rr, sc.expect[policy])
    if error and not (policy in sc.expect and sc.expect[policy].verdict == "error"):
        mism.append(error)
    rr.mismatches = mism
    rr.expected_match = not mism
    return rr


def run_policies(sc: Scenario, policy: str | None = None, **kw) -> list[RunResult]:
    """Run under ``policy`` (a name, ``both``/``all``) or every policy the scenario states."""
    from kvmsim.scenarios.spec import POLICY_ALIASES
    if policy is None:
        policies = sc.policies
    else:
        policies = POLICY_ALIASES.get(policy, (policy,))
    return [run(sc, p, **kw) for p in policies]


__all__ = [
    "KEY_COUNTERS",
    "RunResult",
    "StepResult",
    "build",
    "errno_name",
    "missing_requirement",
    "run",
    "run_policies",
]
