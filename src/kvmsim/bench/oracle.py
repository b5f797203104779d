"""``kvmsim bench dirty-log --backend oracle``: the real tools/testing/selftests/kvm/dirty_log_perf_test.c
inside each oracle kernel (:mod:`kvmsim.backend.oracle.selftests`), kprobe hits and KVM stats per
phase, beside the model's run of the same flow (:mod:`kvmsim.bench.dirty_log_perf`) under the kernel's
protocol (legacy for v6.12, the series for v6.13) with the MMU as KVM runs it on AMD SVM with NPT: no
PML (arch/x86/kvm/svm has none, so dirty logging write-protects) and, for v6.13, its other MMU changes
(in-place huge page recovery when logging is disabled, ``kvm_mmu_recover_huge_pages()``).

The model's counters become kernel-function calls as :mod:`kvmsim.backend.oracle.model_side` maps
them; the bench's bulk paths count by caller (``put_page:kvm_release_pfn_clean``,
``set_dirty:kvm_release_faultin_page``, ``set_dirty:clear_dirty_pt_masked``, ...) instead of calling the
model's helpers, so the calls are rebuilt here from those counters (:func:`model_calls`).

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


_PAGE_HELPERS = ("kvm_release_page_dirty", "kvm_release_page_clean", "kvm_vcpu_unmap")
_HOST_CALLERS = ("follow_page_pte:FOLL_TOUCH", "folio_mark_dirty")
_GUP_TOUCH = "follow_page_pte:FOLL_TOUCH"


def _sum(c: dict[str, int], prefix: str, keep) -> int:
    return sum(v for k, v in c.items() if k.startswith(prefix) and keep(k[len(prefix):]))


def model_calls(policy: str, c: dict[str, int]) -> dict[str, int | None]:
    """Kernel-function calls from one phase's journal counters (the mapping of
    :mod:`kvmsim.backend.oracle.model_side`, rebuilt from counters: the bench's bulk paths count by
    caller instead of calling the model's release helpers).

    v6.12 (virt/kvm/kvm_main.c): ``kvm_release_pfn_clean()`` calls ``kvm_release_page_clean()``,
    ``kvm_release_pfn_dirty()`` calls ``kvm_release_page_dirty()``, which calls
    ``kvm_release_page_clean()``; ``kvm_set_pfn_dirty``/``kvm_set_pfn_accessed`` are every KVM dirty /
    accessed mark not made by those helpers (SPTE zaps, write-protection, splits).  v6.13:
    ``kvm_release_faultin_page()`` (include/linux/kvm_host.h, static inline) calls
    ``kvm_release_page_dirty()`` for a writable mapping, ``kvm_release_page_clean()`` otherwise,
    ``kvm_release_page_unused()`` (also an inline) when the fault is abandoned; v6.13.7's build
    inlines ``kvm_release_page_clean()`` into ``kvm_release_page_dirty()`` (model_side.INLINED).
    ``mark_page_accessed()`` is ``folio_mark_accessed()``'s page wrapper (mm/folio-compat.c); v6.12's
    ``follow_page_pte()`` calls the wrapper, v6.13's the folio function."""

    def g(k: str) -> int:
        return c.get(k, 0)

    all_marks = _sum(c, "mark_accessed:", lambda k: True)
    if policy == "legacy":
        pfn_clean, pfn_dirty = g("put_page:kvm_release_pfn_clean"), g("put_page:kvm_release_pfn_dirty")
        out: dict[str, int | None] = {
            "kvm_release_pfn_clean": pfn_clean, "kvm_release_pfn_dirty": pfn_dirty,
            "kvm_release_page_dirty": pfn_dirty + g("set_dirty:kvm_release_page_dirty"),
            "kvm_release_page_clean": pfn_clean + pfn_dirty + g("mark_accessed:kvm_release_page_clean"),
            "kvm_release_page_unused": None,                                  # added by the series
            "kvm_set_pfn_dirty": _sum(c, "set_dirty:", lambda k: k not in _PAGE_HELPERS + _HOST_CALLERS),
            "kvm_set_pfn_accessed": _sum(c, "mark_accessed:", lambda k: k not in _PAGE_HELPERS + _HOST_CALLERS
                                         + ("kvm_release_pfn_clean", "kvm_release_pfn_dirty")),
            "mark_page_accessed": all_marks, "folio_mark_accessed": all_marks}
    else:
        released = g("put_page:kvm_release_faultin_page") + g("unpin:kvm_release_faultin_page")
        dirty = g("set_dirty:kvm_release_faultin_page")
        accessed = g("mark_accessed:kvm_release_faultin_page")
        out = {"kvm_release_pfn_clean": None, "kvm_release_pfn_dirty": None,          # removed by the series
               "kvm_set_pfn_dirty": None, "kvm_set_pfn_accessed": None,
               "kvm_release_page_dirty": dirty + g("set_dirty:kvm_release_page_dirty"),
               "kvm_release_page_clean": accessed - dirty + g("mark_accessed:kvm_release_page_clean"),
               "kvm_release_page_unused": released - accessed,
               "mark_page_accessed": all_marks - g(f"mark_accessed:{_GUP_TOUCH}"),
               "folio_mark_accessed": all_marks}
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
    verdict: str                       # "agree", "explained", "absent" (no probe), "DISAGREE"
    why: str = ""


@dataclass
class BackingResult:
    backing: str
    vcpu_memory: int
    iterations: int
    rows: list[Row] = field(default_factory=list)
    manual_protect: bool = True         # not -g: MANUAL_PROTECT_ENABLE | INITIALLY_SET
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


def explain(phase: str, counter: str, model: int | None, real: int | None, slot0: int,
            marks0: int = 0) -> tuple[str, str]:
    """``(verdict, why)`` for one count (module docstring).  ``slot0``: faults (``populate``) or
    leaves (later phases) of the selftest's memslot 0 in the real VM; ``marks0``: the accessed marks
    KVM made on slot 0's pages in this phase (they reach ``mark_page_accessed``)."""
    if model == real:
        return "agree", ""
    if real is None:
        # no probe: inlined (kvm_release_page_unused() is a static inline in v6.13's kvm_host.h) or gone
        return "absent", f"not a function in this kernel (no kprobe); the model's {model:,} is not checked"
    if model is None:
        return "DISAGREE", f"removed in the model's protocol but {real:,} calls in the kernel"
    diff = real - model
    if phase == "populate" and counter in ("pf_taken", "pf_fixed", "pages_4k") and diff == slot0:
        return "explained", f"slot 0: {slot0} faults on the selftest's code/stack/page-table pages"
    if phase == "populate" and counter in ("kvm_release_pfn_clean", "kvm_release_page_clean",
                                           "get_user_pages_fast_only") and diff == slot0:
        return "explained", f"slot 0: one per fault ({slot0})"
    if phase == "populate" and counter == "kvm_release_page_dirty" and diff == slot0:
        # v6.13 kvm_mmu_finish_page_fault(): kvm_release_faultin_page(..., fault->map_writable)
        return "explained", f"slot 0: one per fault ({slot0}), dirty because mapped writable"
    if phase not in ("populate", "teardown") and counter == "pages_4k" and diff == slot0:
        return "explained", f"slot 0: {slot0} leaves"
    if phase == "teardown" and counter in ("kvm_set_pfn_dirty", "kvm_set_pfn_accessed") and 0 < diff <= slot0:
        return "explained", f"slot 0: {diff} of its {slot0} leaves zapped with this mark"
    if counter in HOST_WIDE and phase in ("populate", "teardown"):
        # the selftest process starts (exec, file reads) and exits (its mappings torn down) in these
        own = marks0 if counter != "get_user_pages_unlocked" else 0
        residual = diff - own
        if residual >= 0:
            head = f"slot 0: {own}; " if own else ""
            return "explained", f"{head}{residual} outside KVM (process start/exit in the guest)"
    return "DISAGREE", f"real - model = {diff:+,}"


def real_runs(selftest_dir, runs, manual_protect: bool = True) -> list[dict]:
    """Runner specs for ``dirty_log_perf_test -b SIZE -i N -s BACKING [-g]``, phase lines split."""
    from kvmsim.backend.oracle.selftests import PHASE_LINE
    from kvmsim.bench.report import size_name
    return [{"name": backing, "argv": [f"{selftest_dir}/dirty_log_perf_test", "-b", size_name(size), "-i", str(it),
                                       "-s", backing, *(() if manual_protect else ("-g",))],
             "phase_re": PHASE_LINE.pattern, "timeout": 300 if size >= 1 << 30 else 120}
            for backing, size, it in runs]


def model_phases(policy: str, backing: str, size: int, iterations: int, manual_protect: bool = True):
    """The model's run of the same flow: AMD SVM (no PML), v6.13's other MMU changes for the series,
    the VM's destruction as ``teardown``, leaf counts per phase."""
    from kvmsim.bench.dirty_log_perf import Options, run_model
    opts = Options(vcpu_memory=size, iterations=iterations, backing=backing, pml=False, teardown=True,
                   phase_stats=True, v613_other=policy == "series", manual_protect=manual_protect)
    return run_model(opts, policy)


def compare(policy: str, backing: str, size: int, iterations: int, real: dict, absent: dict,
            manual_protect: bool = True) -> BackingResult:
    """One backing: the model's phases against the real run's (the runner's JSON for that selftest)."""
    from kvmsim.backend.oracle.selftests import split_phases
    res = BackingResult(backing, size, iterations, returncode=real.get("returncode"), seconds=real.get("seconds"),
                        manual_protect=manual_protect)
    if real.get("timed_out") or real.get("returncode") != 0:
        tail = "\n".join(real.get("output", [])[-15:])
        res.error = f"dirty_log_perf_test exited {real.get('returncode')}" + \
            (" (timed out)" if real.get("timed_out") else "") + f":\n{tail}"
        return res
    reals = {(p.name, p.iteration): p for p in split_phases(real["snapshots"], absent)}
    model = model_phases(policy, backing, size, iterations, manual_protect)
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
        if mp.name == "populate":
            marks0 = slot0                      # every release marks the page accessed
        elif mp.name == "teardown" and policy == "legacy":
            marks0 = (rp.calls.get("kvm_set_pfn_accessed") or 0) - (calls.get("kvm_set_pfn_accessed") or 0)
        else:
            marks0 = 0
        for counter in FUNCTIONS + STATS:
            if mp.name == "teardown" and counter in STATS:
                continue                # the VM and its stats are gone
            m = calls.get(counter) if counter in FUNCTIONS else stats.get(counter)
            r = _real_value(rp, counter)
            if counter in FUNCTIONS and m is None and r is None:
                res.rows.append(Row(mp.name, mp.iteration, counter, None, None, "agree", "absent in both"))
                continue
            verdict, why = explain(mp.name, counter, m, r, slot0, marks0)
            res.rows.append(Row(mp.name, mp.iteration, counter, m, r, verdict, why))
    return res


@dataclass
class KernelBench:
    """dirty_log_perf_test in one kernel, every backing, beside the model under its protocol."""

    release: str
    policy: str
    backings: list[BackingResult] = field(default_factory=list)
    boot_seconds: float | None = None
    uptime: float | None = None
    absent: dict[str, str] = field(default_factory=dict)
    note: str = ""
    error: str = ""

    @property
    def agreed(self) -> bool:
        return not self.error and all(b.agreed for b in self.backings)

    def to_json(self) -> dict:
        d = asdict(self)
        d["agreed"] = self.agreed
        for b, src in zip(d["backings"], self.backings):
            b["agreed"] = src.agreed
        return d


def run_oracle_bench(kernel, runs=DEFAULT_RUNS, *, manual_protect: bool = True, config=None) -> KernelBench:
    """One boot of ``kernel`` running dirty_log_perf_test once per backing, then the model's runs."""
    from kvmsim.backend.oracle.boot import BootConfig, OracleError
    from kvmsim.backend.oracle.selftests import run_batch, selftest_dir_for
    d, note = selftest_dir_for(kernel)
    out = KernelBench(kernel.release, kernel.policy, note=note)
    if d is None:
        out.error = note
        return out
    specs = real_runs(d, runs, manual_protect)
    cfg = config or BootConfig(timeout=sum(s["timeout"] for s in specs) + 120)
    try:
        result, res = run_batch(kernel, specs, PROBES, config=cfg)
    except OracleError as e:
        out.error = str(e)
        return out
    out.boot_seconds, out.uptime, out.absent = res.seconds, res.uptime, result.get("absent", {})
    by_name = {r["name"]: r for r in result["runs"]}
    for backing, size, it in runs:
        real = by_name.get(backing)
        if real is None:
            out.backings.append(BackingResult(backing, size, it, error="not run"))
            continue
        out.backings.append(compare(kernel.policy, backing, size, it, real, out.absent, manual_protect))
    return out


_COLUMNS = {
    "legacy": ("kvm_release_pfn_clean", "kvm_set_pfn_dirty", "kvm_set_pfn_accessed", "mark_page_accessed",
               "get_user_pages_unlocked", "pf_taken", "pf_fast", "pages_4k", "pages_2m", "pages_1g"),
    "series": ("kvm_release_page_dirty", "kvm_release_page_clean", "mark_page_accessed", "folio_mark_accessed",
               "get_user_pages_unlocked", "pf_taken", "pf_fast", "pages_4k", "pages_2m", "pages_1g"),
}
_SHORT = {"kvm_release_pfn_clean": "rel_pfn_clean", "kvm_set_pfn_dirty": "set_pfn_dirty",
          "kvm_set_pfn_accessed": "set_pfn_acc", "mark_page_accessed": "mark_page_acc",
          "folio_mark_accessed": "folio_mark_acc", "get_user_pages_unlocked": "gup_unlocked",
          "kvm_release_page_dirty": "rel_page_dirty", "kvm_release_page_clean": "rel_page_clean"}


def _cell(row: Row | None) -> str:
    if row is None:
        return "-"
    if row.verdict in ("agree", "absent") and row.model is None and row.real is None:
        return "absent"
    if row.verdict == "agree":
        return f"{row.real:,}"
    if row.verdict == "absent":
        return f"{row.model:,}/absent"
    m = "-" if row.model is None else f"{row.model:,}"
    r = "-" if row.real is None else f"{row.real:,}"
    mark = "*" if row.verdict == "explained" else " [red]✗[/red]"
    return f"{m}→{r}{mark}"


def backing_table(kb: KernelBench, b: BackingResult):
    """Rows: phases; cells: the count where model and kernel agree, ``model→real*`` where the
    difference is explained (listed under the table), ``model→real ✗`` where it is not."""
    from rich.table import Table

    from kvmsim.bench.report import short_label, size_name
    cols = _COLUMNS[kb.policy]
    t = Table(title=f"{kb.release} ({kb.policy}), -s {b.backing} -b {size_name(b.vcpu_memory)} -i {b.iterations}{'' if b.manual_protect else ' -g'}: "
                    f"model vs real dirty_log_perf_test", title_justify="left", pad_edge=False, padding=(0, 1))
    t.add_column("phase", no_wrap=True)
    for c in cols:
        t.add_column(_SHORT.get(c, c), justify="right", no_wrap=True)
    phases: list[tuple[str, int | None]] = []
    for r in b.rows:
        if (r.phase, r.iteration) not in phases:
            phases.append((r.phase, r.iteration))
    index = {(r.phase, r.iteration, r.counter): r for r in b.rows}
    for ph, it in phases:
        t.add_row(short_label(ph, it), *(_cell(index.get((ph, it, c))) for c in cols))
    return t


def notes(b: BackingResult) -> list[str]:
    """The explained and disagreeing counts of one backing (all counters, not only the table's
    columns), one line per counter and reason, with the phases it holds in."""
    from kvmsim.bench.report import short_label
    groups: dict[tuple[str, str, str, int | None], list[str]] = {}
    for r in b.rows:
        if r.verdict in ("explained", "DISAGREE") or (r.verdict == "absent" and r.model):
            diff = None if r.model is None or r.real is None else r.real - r.model
            groups.setdefault((r.verdict, r.counter, r.why, diff), []).append(short_label(r.phase, r.iteration))
    out = []
    for (verdict, counter, why, diff), phases in groups.items():
        tag = {"explained": "*", "DISAGREE": "[red]✗[/red]", "absent": "absent:"}[verdict]
        d = "" if diff is None else f"real - model = {diff:+,}; "
        out.append(f"{tag} {counter} ({', '.join(phases)}): {d}{why}")
    return out


_UNSUPPORTED = {"vcpus": "-v", "write_percent": "-w", "slots": "-x",
                "run_while_disabling": "-e", "plot_path": "--plot", "v613_other": "--v613-other",
                "policy": "--policy (the kernel decides: legacy before v6.13)", "seed": "-r"}


def oracle_runs(ctx) -> tuple:
    """The (backing, size, iterations) runs from ``kvmsim bench dirty-log`` options: every backing of
    :data:`DEFAULT_RUNS` unless ``-s`` is given; ``-b``/``-i`` override the per-backing defaults."""
    from click.core import ParameterSource

    from kvmsim.errors import UsageError

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)

    bad = [flag for name, flag in _UNSUPPORTED.items() if given(name)]
    if bad:
        raise UsageError(f"{', '.join(bad)}: not supported with --backend oracle (the real selftest runs "
                         f"one vCPU, one memslot, 100% writes)")
    p = ctx.params
    sizes = p["vcpu_memory"]
    if given("vcpu_memory") and len(sizes) != 1:
        raise UsageError("-b: --backend oracle takes one size")
    runs = DEFAULT_RUNS
    if given("backing"):
        default = {b: (s, i) for b, s, i in DEFAULT_RUNS}.get(p["backing"], (64 << 20, 3))
        runs = ((p["backing"], *default),)
    runs = tuple((b, sizes[0] if given("vcpu_memory") else s, p["iterations"] if given("iterations") else i)
                 for b, s, i in runs)
    for b, s, _ in runs:
        page = {"anonymous_hugetlb_1gb": 1 << 30}.get(b, 2 << 20 if "hugetlb" in b or b == "anonymous_thp" else 4096)
        if s % page:
            from kvmsim.bench.report import size_name
            raise UsageError(f"-b {size_name(s)}: -s {b} needs a multiple of {size_name(page)}")
    return runs


def oracle_main(ctx, kernels=(), as_json: bool = False) -> int:
    """``kvmsim bench dirty-log --backend oracle``: exit status 0 when every count agrees or is
    explained, 1 when one disagrees, 2 on bad input or no oracle."""
    import json
    import sys

    import click
    from rich.console import Console

    from kvmsim.backend.oracle.boot import qemu_binary
    from kvmsim.backend.oracle.kernels import find_kernels
    from kvmsim.errors import KvmsimError

    console = Console(stderr=as_json, width=None if sys.stdout.isatty() else 200)
    try:
        runs = oracle_runs(ctx)
        found = find_kernels(list(kernels) or None)
        if not found:
            raise KvmsimError("no oracle kernels found (give --kernel or set KVMSIM_ORACLE_KERNELS)")
        if qemu_binary() is None:
            raise KvmsimError("qemu-system-x86_64 not found: install qemu-system-x86 (`kvmsim oracle setup`)")
        results = []
        for k in found:
            console.print(f"booting {k.path.name} ({k.release}, {k.policy}): dirty_log_perf_test on "
                          f"{', '.join(b for b, _, _ in runs)} ...", highlight=False)
            results.append(run_oracle_bench(k, runs, manual_protect=not ctx.params["no_manual_protect"]))
    except KvmsimError as e:
        if as_json:
            click.echo(json.dumps({"error": str(e)}))
        else:
            click.echo(f"kvmsim bench dirty-log: {e}", err=True)
        return 2
    if as_json:
        click.echo(json.dumps({"kernels": [r.to_json() for r in results]}, indent=1))
    else:
        for kb in results:
            if kb.error:
                console.print(f"[red]{kb.release}: {kb.error}[/red]")
            for b in kb.backings:
                if b.error:
                    console.print(f"[red]{kb.release} -s {b.backing}: {b.error}[/red]")
                    continue
                console.print(backing_table(kb, b))
                for line in notes(b):
                    console.print("  " + line, soft_wrap=True)
            if kb.boot_seconds is not None:
                console.print(f"{kb.release}: one boot, {kb.boot_seconds:.1f} s wall (guest uptime "
                              f"{kb.uptime or 0:.1f} s); " + ("every count agrees or is explained" if kb.agreed
                                                             else "[red]some counts disagree[/red]"))
    return 0 if all(r.agreed for r in results) else 1
