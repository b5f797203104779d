"""``kvmsim bench dirty-log --backend oracle``: the real tools/testing/selftests/kvm/dirty_log_perf_test.c
inside each oracle kernel (:mod:`kvmsim.backend.oracle.selftests`), kprobe hits and KVM stats per
phase, beside the model's run of the same flow (:mod:`kvmsim.bench.dirty_log_perf`) under the kernel's
protocol (legacy for v6.12, the series for v6.13) with the MMU as KVM runs it on AMD SVM with NPT: no
PML (arch/x86/kvm/svm has none, so dirty logging write-protects) and, for v6.13, its other MMU changes
(in-place huge page recovery when logging is disabled, ``kvm_mmu_recover_huge_pages()``).

The model's counters become kernel-function calls as :mod:`kvmsim.backend.oracle.model_side` maps
them; the bench's bulk paths count releases by caller (``put_page:kvm_release_pfn_clean``,
``set_dirty:kvm_release_faultin_page``, ...) instead of through the model's release helpers, so the
release columns are rebuilt here from those counters (:func:`model_calls`).

Every compared count either agrees or carries the reason it differs (:func:`explain`):

- ``slot 0``: the selftest's own memslot 0 (guest code, stacks, the guest page tables that map the test
  memory, lib/kvm_util.c ``vm_create()``), which the model does not hold.  In ``populate`` its first
  touches are faults on pages the host already wrote, so each adds exactly one fault, one release and
  one accessed mark and no GUP slow path; in ``teardown`` its leaves are zapped with the test memory's.
- ``outside KVM``: ``mark_page_accessed``/``folio_mark_accessed``/``get_user_pages_unlocked`` are mm
  functions the whole guest calls (exec, file reads); what remains after slot 0 is not KVM's, shown
  as the residual.  A negative residual is a disagreement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kvmsim.backend.oracle.selftests import RealPhase

#: The kernel functions compared (those the model claims), then the KVM stats.
FUNCTIONS = ("kvm_release_pfn_clean", "kvm_release_pfn_dirty", "kvm_release_page_clean", "kvm_release_page_dirty",
             "kvm_release_page_unused", "kvm_set_pfn_dirty", "kvm_set_pfn_accessed", "mark_page_accessed",
             "folio_mark_accessed", "get_user_pages_fast_only", "get_user_pages_unlocked")
STATS = ("pf_taken", "pf_fixed", "pf_fast", "pages_4k", "pages_2m", "pages_1g")
#: mm functions the whole guest calls, not only KVM.
HOST_WIDE = ("mark_page_accessed", "folio_mark_accessed", "get_user_pages_unlocked")
#: The probes the real side needs.
PROBES = FUNCTIONS + ("folio_mark_dirty", "kvm_mmu_recover_huge_pages", "kvm_mmu_zap_collapsible_sptes")

DEFAULT_RUNS = (("anonymous", 64 << 20, 3), ("anonymous_thp", 64 << 20, 3),
                ("anonymous_hugetlb_2mb", 64 << 20, 3), ("anonymous_hugetlb_1gb", 1 << 30, 2))


def model_calls(policy: str, c: dict[str, int]) -> dict[str, int | None]:
    """Kernel-function calls from one phase's journal counters (module docstring).

    v6.12 (virt/kvm/kvm_main.c): ``kvm_release_pfn_clean()`` calls ``kvm_release_page_clean()``,
    ``kvm_release_pfn_dirty()`` calls ``kvm_release_page_dirty()``, which calls
    ``kvm_release_page_clean()``.  v6.13: ``kvm_release_faultin_page()`` (include/linux/kvm_host.h,
    static inline) calls ``kvm_release_page_dirty()`` for a write fault, ``kvm_release_page_clean()``
    for a read, ``kvm_release_page_unused()`` when the fault is abandoned; v6.13.7's build inlines
    ``kvm_release_page_clean()`` into ``kvm_release_page_dirty()`` (model_side.INLINED).
    ``mark_page_accessed()`` is ``folio_mark_accessed()``'s page wrapper (mm/folio-compat.c); v6.12's
    ``follow_page_pte()`` calls the wrapper, v6.13's the folio function."""
    from kvmsim.backend.oracle.model_side import CALL_MAPS

    def g(k: str) -> int:
        return c.get(k, 0)

    if policy == "legacy":
        pfn_clean, pfn_dirty = g("put_page:kvm_release_pfn_clean"), g("put_page:kvm_release_pfn_dirty")
        calls = {"kvm_release_pfn_clean": pfn_clean, "kvm_release_pfn_dirty": pfn_dirty,
                 "kvm_release_page_dirty": pfn_dirty + g("set_dirty:kvm_release_page_dirty"),
                 "kvm_release_page_clean": pfn_clean + pfn_dirty + g("mark_accessed:kvm_release_page_clean")}
        out = CALL_MAPS["legacy"](c, calls)
        out["kvm_release_page_unused"] = None                     # added by the series
        out["folio_mark_accessed"] = out["mark_page_accessed"]
    else:
        released = g("put_page:kvm_release_faultin_page") + g("unpin:kvm_release_faultin_page")
        dirty = g("set_dirty:kvm_release_faultin_page")
        accessed = g("mark_accessed:kvm_release_faultin_page")
        calls = {"kvm_release_page_dirty": dirty + g("set_dirty:kvm_release_page_dirty"),
                 "kvm_release_page_clean": accessed - dirty + g("mark_accessed:kvm_release_page_clean"),
                 "kvm_release_page_unused": released - accessed}
        out = CALL_MAPS["series"](c, calls)
        for fn in ("kvm_release_pfn_clean", "kvm_release_pfn_dirty", "kvm_set_pfn_dirty", "kvm_set_pfn_accessed"):
            out[fn] = None                                        # removed by the series
        out["folio_mark_accessed"] = sum(v for k, v in c.items() if k.startswith("mark_accessed:"))
    out["get_user_pages_fast_only"] = g("gup_fast")
    out["get_user_pages_unlocked"] = g("gup_slow")
    return out


def model_stats(c: dict[str, int], end: dict[str, int]) -> dict[str, int]:
    """KVM stats from one phase's counters: every model fault is fixed (``pf_fixed``)."""
    out = {"pf_taken": c.get("page_fault", 0), "pf_fixed": c.get("page_fault", 0),
           "pf_fast": c.get("fast_page_fault", 0)}
    out.update(end)
    return out


@dataclass
class Row:
    phase: str
    iteration: int | None
    counter: str
    model: int | None
    real: int | None
    verdict: str                       # "agree", "explained", "DISAGREE"
    why: str = ""


@dataclass
class BackingResult:
    backing: str
    vcpu_memory: int
    iterations: int
    rows: list[Row] = field(default_factory=list)
    returncode: int | None = None
    seconds: float | None = None
    error: str = ""

    @property
    def agreed(self) -> bool:
        return not self.error and all(r.verdict != "DISAGREE" for r in self.rows)

    def to_json(self) -> dict:
        return asdict(self)


def _real_value(rp: RealPhase, counter: str) -> int | None:
    if counter in FUNCTIONS:
        return rp.calls.get(counter)
    if counter in ("pages_4k", "pages_2m", "pages_1g"):
        return rp.stats_end.get(counter)
    return rp.stats.get(counter)


def explain(phase: str, counter: str, model: int | None, real: int | None, slot0: int) -> tuple[str, str]:
    """``(verdict, why)`` for one count (module docstring).  ``slot0``: faults (``populate``) or
    leaves (later phases) of the selftest's memslot 0 in the real VM."""
    if model == real:
        return "agree", ""
    if model is None or real is None:
        return "DISAGREE", ("absent in the kernel" if real is None else "absent in the model") + \
            f" but {model if real is None else real} in the other"
    diff = real - model
    if phase == "populate" and counter in ("pf_taken", "pf_fixed", "pages_4k") and diff == slot0:
        return "explained", f"slot 0: {slot0} faults on the selftest's code/stack/page-table pages"
    if phase == "populate" and counter in ("kvm_release_pfn_clean", "kvm_release_page_clean",
                                           "get_user_pages_fast_only") and diff == slot0:
        return "explained", f"slot 0: one per fault ({slot0})"
    if phase != "populate" and phase != "teardown" and counter == "pages_4k" and diff == slot0:
        return "explained", f"slot 0: {slot0} leaves"
    if phase == "teardown" and counter in ("kvm_set_pfn_dirty", "kvm_set_pfn_accessed") and 0 < diff <= slot0:
        return "explained", f"slot 0: {diff} of its {slot0} leaves zapped with this mark"
    if counter in HOST_WIDE:
        own = slot0 if phase == "populate" and counter != "get_user_pages_unlocked" else 0
        residual = diff - own
        if residual >= 0:
            head = f"slot 0: {own}; " if own else ""
            return "explained", f"{head}{residual} calls outside KVM (guest-wide mm function)"
    return "DISAGREE", f"real - model = {diff:+,}"


def real_runs(selftest_dir, runs) -> list[dict]:
    """Runner specs for ``dirty_log_perf_test -b SIZE -i N -s BACKING``, phase lines split."""
    from kvmsim.backend.oracle.selftests import PHASE_LINE
    from kvmsim.bench.report import size_name
    return [{"name": backing, "argv": [f"{selftest_dir}/dirty_log_perf_test", "-b", size_name(size), "-i", str(it),
                                       "-s", backing],
             "phase_re": PHASE_LINE.pattern, "timeout": 300 if size >= 1 << 30 else 120}
            for backing, size, it in runs]


def model_phases(policy: str, backing: str, size: int, iterations: int):
    """The model's run of the same flow: AMD SVM (no PML), v6.13's other MMU changes for the series,
    the VM's destruction as ``teardown``, leaf counts per phase."""
    from kvmsim.bench.dirty_log_perf import Options, run_model
    opts = Options(vcpu_memory=size, iterations=iterations, backing=backing, pml=False, teardown=True,
                   phase_stats=True, v613_other=policy == "series")
    return run_model(opts, policy)


def compare(policy: str, backing: str, size: int, iterations: int, real: dict, absent: dict) -> BackingResult:
    """One backing: the model's phases against the real run's (the runner's JSON for that selftest)."""
    from kvmsim.backend.oracle.selftests import split_phases
    res = BackingResult(backing, size, iterations, returncode=real.get("returncode"), seconds=real.get("seconds"))
    if real.get("timed_out") or real.get("returncode") != 0:
        tail = "\n".join(real.get("output", [])[-15:])
        res.error = f"dirty_log_perf_test exited {real.get('returncode')}" + \
            (" (timed out)" if real.get("timed_out") else "") + f":\n{tail}"
        return res
    reals = {(p.name, p.iteration): p for p in split_phases(real["snapshots"], absent)}
    model = model_phases(policy, backing, size, iterations)
    leaves0 = 0                        # slot 0's leaves in the real VM at the end of the last phase
    for mp in model.phases:
        rp = reals.get((mp.name, mp.iteration))
        if rp is None:
            res.rows.append(Row(mp.name, mp.iteration, "(phase)", None, None, "DISAGREE",
                                "the real selftest printed no such phase"))
            continue
        calls = model_calls(policy, mp.counters)
        stats = model_stats(mp.counters, mp.stats if mp.name != "teardown" else {})
        if mp.name == "populate":
            slot0 = rp.stats.get("pf_taken", 0) - stats["pf_taken"]
        elif mp.name == "teardown":
            slot0 = leaves0
        else:
            slot0 = rp.stats_end.get("pages_4k", 0) - stats.get("pages_4k", 0)
        if mp.name != "teardown":
            leaves0 = rp.stats_end.get("pages_4k", 0) - stats.get("pages_4k", 0)
        for counter in FUNCTIONS + STATS:
            if mp.name == "teardown" and counter in STATS:
                continue                # the VM and its stats are gone
            m = calls.get(counter) if counter in FUNCTIONS else stats.get(counter)
            r = _real_value(rp, counter)
            if counter in FUNCTIONS and m is None and r is None:
                res.rows.append(Row(mp.name, mp.iteration, counter, None, None, "agree", "absent in both"))
                continue
            verdict, why = explain(mp.name, counter, m, r, slot0)
            res.rows.append(Row(mp.name, mp.iteration, counter, m, r, verdict, why))
    return res
