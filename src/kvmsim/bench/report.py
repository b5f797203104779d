"""What ``kvmsim bench dirty-log`` prints: the selftest's lines (seconds with 9 decimals, as its
``%ld.%.9lds``), kvmsim's cost tables per policy, the model-vs-real comparison, JSON and a plot."""

from __future__ import annotations

from kvmsim.bench.dirty_log_perf import COLUMNS, RunResult
from kvmsim.errors import UsageError

_LABEL = {"populate": "Populate memory", "enable": "Enabling dirty logging",
          "disable": "Disabling dirty logging", "before-disable": "vCPUs dirtying before disabling (-e)",
          "after-disable": "vCPUs running after disabling (-e)"}


def ts(seconds: float) -> str:
    """``%ld.%.9lds``."""
    ns = round(seconds * 1e9)
    return f"{ns // 10**9}.{ns % 10**9:09d}s"


def phase_label(name: str, iteration: int | None) -> str:
    if name in ("dirty", "get", "clear"):
        what = {"dirty": "dirty memory", "get": "get dirty log", "clear": "clear dirty log"}[name]
        return f"Iteration {iteration} {what}"
    return _LABEL.get(name, name)


def selftest_lines(r: RunResult) -> list[str]:
    """dirty_log_perf_test's pr_info lines for one run."""
    o = r.options
    total = o["vcpu_memory"] * o["vcpus"]
    lines = [f"Test iterations: {o['iterations']}",
             "Testing guest mode: PA-bits:52,  VA-bits:48,  4K pages",
             f"guest physical test memory: [{1 << 32:#x}, {(1 << 32) + total:#x})",
             f"Random seed: {o['seed']}"]
    for p in r.phases:
        lines.append(f"{phase_label(p.name, p.iteration)} time: {ts(p.seconds)}")
    n = o["iterations"]
    get = r.total("get")
    lines.append(f"Get dirty log over {n} iterations took {ts(get)}. (Avg {ts(get / n)}/iteration)")
    if o["manual_protect"]:
        clr = r.total("clear")
        lines.append(f"Clear dirty log over {n} iterations took {ts(clr)}. (Avg {ts(clr / n)}/iteration)")
    return lines


_HEAD = {"set_dirty": "dirty", "mark_accessed": "accessed", "get_page": "get", "put_page": "put",
         "pin": "pin", "unpin": "unpin", "spte_write": "SPTE wr", "tlb_flush": "TLB fl",
         "page_fault": "faults", "fast_page_fault": "fast PF"}
_SHORT = {"populate": "populate", "enable": "enable log", "disable": "disable log",
          "before-disable": "-e before", "after-disable": "-e after"}


def short_label(name: str, iteration: int | None) -> str:
    return f"it{iteration} {name}" if name in ("dirty", "get", "clear") else _SHORT.get(name, name)


def cost_table(r: RunResult, title: str):
    """Phase, seconds, the phase's time as a multiple of its memory floor (when the run measured
    floors, :mod:`kvmsim.bench.floor`), struct-page operations by kind (dirty, accessed, get, put,
    pin, unpin), then SPTE writes, TLB flushes, faults and fast faults."""
    from rich.table import Table
    floors = any(p.floor_seconds for p in r.phases)
    t = Table(title=title, title_justify="left", pad_edge=False, padding=(0, 1))
    t.add_column("phase", no_wrap=True)
    t.add_column("seconds", justify="right", no_wrap=True)
    if floors:
        t.add_column("x floor", justify="right", no_wrap=True)
        t.add_column("CPU x floor", justify="right", no_wrap=True)
    for c in COLUMNS:
        t.add_column(_HEAD[c], justify="right", no_wrap=True)
    for p in r.phases:
        s = p.summary()
        mult = [_multiple(p.floor_multiple), _multiple(p.floor_multiple_cpu)] if floors else []
        t.add_row(short_label(p.name, p.iteration), f"{p.seconds:.6f}", *mult, *(f"{s[c]:,}" for c in COLUMNS))
    return t


def _multiple(m: float | None) -> str:
    return "-" if m is None else f"{m:,.1f}x"


def floor_line(r: RunResult) -> str | None:
    """The whole flow against its floor: the floors' sum, the copy bandwidth, the per-page state and
    the multiple (None when the run measured no floor)."""
    if not r.copy_bandwidth:
        return None
    state = sum(v for v in r.state_bytes.values())
    f = r.floor_seconds()
    if f is None:
        return (f"memory floor: not defined for this flow (4 KiB anonymous, manual protect, -w 100 only); "
                f"per-page state {state:g} B, copy bandwidth {r.copy_bandwidth / 1e9:.1f} GB/s")
    return (f"memory floor: {f:.4f} s for the timed phases at {r.copy_bandwidth / 1e9:.1f} GB/s copy "
            f"bandwidth (per-page state {state:g} B); the phases took {r.floor_multiple():.1f}x their floor "
            f"(CPU time: {r.floor_multiple(cpu=True):.1f}x, at {r.copy_bandwidth_cpu / 1e9:.1f} GB/s per CPU second)")


def compare_table(model: RunResult, real: RunResult):
    from rich.table import Table
    t = Table(title="model vs real /dev/kvm (same flow)", title_justify="left")
    for c in ("phase", "model", "real KVM", "real / model"):
        t.add_column(c, justify="left" if c == "phase" else "right")
    rows = [(p.name, p.iteration) for p in real.phases]
    for name, it in rows + [("total", None)]:
        if name == "total":
            m, k = sum(p.seconds for p in model.phases if (p.name, p.iteration) in rows), real.wall_seconds
            m = model.wall_seconds
        else:
            try:
                m = model.phase(name, it).seconds
            except KeyError:
                continue
            k = real.phase(name, it).seconds
        t.add_row("whole flow (wall)" if name == "total" else phase_label(name, it), ts(m), ts(k),
                  f"{k / m:,.1f}x" if m > 0 else "-")
    return t


def size_name(nbytes: int) -> str:
    """``-b`` notation for a byte count: 1G, 512M, 3K (plain bytes if none divides)."""
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return str(nbytes)


def flow_totals(r: RunResult) -> dict[str, int]:
    """A run's cost counters summed over its phases."""
    out = dict.fromkeys(COLUMNS, 0)
    for p in r.phases:
        for k, v in p.summary().items():
            out[k] = out.get(k, 0) + v
    return out


def scaling_table(results: list[RunResult]):
    """One row per model run over several sizes: wall time, its ratio to the smallest size's run
    of the same policy next to the size ratio (linear scaling keeps them equal), peak RSS, and the
    flow's struct-page, SPTE and TLB totals."""
    from rich.table import Table
    t = Table(title="scaling over sizes (whole flow)", title_justify="left", pad_edge=False, padding=(0, 1))
    for c in ("-b", "policy", "wall s", "x time", "x size", "peak RSS GiB", "dirty", "accessed", "SPTE wr",
              "TLB fl", "faults"):
        t.add_column(c, justify="left" if c in ("-b", "policy") else "right", no_wrap=True)
    smallest: dict[str, RunResult] = {}
    for r in sorted(results, key=lambda r: (r.options["vcpu_memory"], r.policy)):
        base = smallest.setdefault(r.policy, r)
        tot = flow_totals(r)
        t.add_row(size_name(r.options["vcpu_memory"]), r.policy, f"{r.wall_seconds:.3f}",
                  f"{r.wall_seconds / base.wall_seconds:.2f}" if base.wall_seconds else "-",
                  f"{r.options['vcpu_memory'] / base.options['vcpu_memory']:g}",
                  f"{r.peak_rss_bytes / 2**30:.2f}",
                  *(f"{tot[c]:,}" for c in ("set_dirty", "mark_accessed", "spte_write", "tlb_flush", "page_fault")))
    return t


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'kvmsim[plot]'") from None
    return plt


def check_plot_path(path: str) -> None:
    """Refuse a ``--plot`` path before the run: matplotlib present, the directory exists and is
    writable, the extension names a format matplotlib writes."""
    import os
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError(f"--plot {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise UsageError(f"--plot {path}: directory {d} is not writable")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if not ext:
        raise UsageError(f"--plot {path}: name the format with an extension ({', '.join(formats)})")
    if ext not in formats:
        raise UsageError(f"--plot {path}: format {ext!r} is not supported; use one of {', '.join(formats)}")


def plot(results: list[RunResult], path: str) -> None:
    """One size: phase times and cost counters, one bar group per phase, one bar per run.  Several
    sizes: wall time and the flow's counters against the guest size, one line per backend:policy."""
    if len({r.options["vcpu_memory"] for r in results}) > 1:
        return _plot_sizes(results, path)
    plt = _pyplot()
    import numpy as np
    phases = [(p.name, p.iteration) for p in results[0].phases]
    labels = [phase_label(n, i).replace("Iteration ", "it") for n, i in phases]
    keys = ["seconds", "set_dirty", "mark_accessed", "spte_write", "tlb_flush", "page_fault"]
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(8, len(phases) * 1.1), 2.4 * len(keys)), sharex=True)
    x = np.arange(len(phases))
    w = 0.8 / len(results)
    for k, r in enumerate(results):
        tag = f"{r.backend}:{r.policy}"
        for ax, key in zip(axes, keys):
            vals = []
            for name, it in phases:
                try:
                    p = r.phase(name, it)
                except KeyError:
                    vals.append(0)
                    continue
                vals.append(p.seconds if key == "seconds" else p.summary().get(key, 0))
            ax.bar(x + k * w, vals, w, label=tag)
            ax.set_ylabel(key)
    axes[0].legend(fontsize="small")
    axes[-1].set_xticks(x + w * (len(results) - 1) / 2, labels, rotation=30, ha="right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def _plot_sizes(results: list[RunResult], path: str) -> None:
    plt = _pyplot()
    from matplotlib.ticker import LogFormatterSciNotation
    keys = ["seconds", "set_dirty", "mark_accessed", "spte_write", "tlb_flush"]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.4 * len(keys)), sharex=True)
    runs: dict[str, list[RunResult]] = {}
    for r in results:
        runs.setdefault(f"{r.backend}:{r.policy}", []).append(r)
    for tag, rs in runs.items():
        rs.sort(key=lambda r: r.options["vcpu_memory"])
        gib = [r.options["vcpu_memory"] * r.options["vcpus"] / 2**30 for r in rs]
        for ax, key in zip(axes, keys):
            ys = [r.wall_seconds if key == "seconds" else flow_totals(r).get(key, 0) for r in rs]
            ax.plot(gib, ys, marker="o", label=tag)
            ax.set_ylabel("wall s" if key == "seconds" else key)
            ax.set_xscale("log", base=2)
            if min(ys) > 0:
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axes[0].legend(fontsize="small")
    axes[-1].set_xlabel("guest test memory (GiB)")
    fig.tight_layout()
    fig.savefig(path)
