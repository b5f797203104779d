"""The printed tables, the JSON object and the plot of ``kvmsim bench replay``."""

from __future__ import annotations

from kvmsim.bench.replay.common import ReplayResult

#: The JSON object's version (tests/bench/test_replay_cli.py checks the schema).
SCHEMA = 1

DIRTY_COLUMNS = ("lost", "over", "iter", "conv", "downtime ms", "sent", "faults", "fast", "tlb flush", "spte write",
                 "get", "put", "dirty", "accessed", "pin", "virtual s", "wall s")
GPU_COLUMNS = ("read ok", "write ok", "efault", "failed blobs", "foreign refs", "violations", "faults",
               "tlb flush", "get", "put", "dirty", "accessed", "pin", "wall s")


def _human(params: dict) -> str:
    out = []
    for k, v in params.items():
        if v is None:
            continue
        if isinstance(v, int) and not isinstance(v, bool) and ("bytes" in k or k == "memory") and v >= 1 << 14:
            v = (f"{v / 2**20:g} MiB" if v >= 1 << 20 else f"{v >> 10} KiB") + ("/s" if k.endswith("_s") else "")
        out.append(f"{k}={v}")
    return ", ".join(out)


def dirty_row(r: ReplayResult) -> list[str]:
    c = r.counters
    conv = "-" if r.converged is None else ("yes" if r.converged else "NO")
    return [f"{r.pages_lost:,}", f"{r.pages_over_reported:,}", str(r.iterations), conv,
            "-" if r.downtime_ms is None else f"{r.downtime_ms:.0f}", f"{r.pages_sent:,}", f"{r.faults:,}",
            f"{c.get('fast_page_fault', 0):,}",
            f"{c.get('tlb_flush', 0):,}", f"{c.get('spte_write', 0):,}", f"{c.get('get_page', 0):,}",
            f"{c.get('put_page', 0):,}", f"{c.get('set_dirty', 0):,}", f"{c.get('mark_accessed', 0):,}",
            f"{c.get('pin', 0):,}", f"{r.virtual_seconds:.1f}", f"{r.wall_seconds:.2f}"]


def gpu_row(r: ReplayResult) -> list[str]:
    c, x = r.counters, r.extra
    viol = " ".join(f"{k}×{v}" for k, v in sorted(x["violations"].items())) or "-"
    return [f"{x['exits']['read'].get('ok', 0):,}", f"{x['exits']['write'].get('ok', 0):,}", f"{x['efault']:,}",
            f"{x['failed_blobs']}/{r.iterations}", f"{x['foreign_refs']:,}", viol, f"{r.faults:,}",
            f"{c.get('tlb_flush', 0):,}", f"{c.get('get_page', 0):,}", f"{c.get('put_page', 0):,}",
            f"{c.get('set_dirty', 0):,}", f"{c.get('mark_accessed', 0):,}", f"{c.get('pin', 0):,}",
            f"{r.wall_seconds:.2f}"]


def ordered(results: list[ReplayResult]) -> list[ReplayResult]:
    """Protocols side by side: the runs of one (arch, variant) next to each other, in run order."""
    keys: list[tuple] = []
    for r in results:
        if (r.arch, r.variant) not in keys:
            keys.append((r.arch, r.variant))
    return sorted(results, key=lambda r: keys.index((r.arch, r.variant)))


def table(name: str, results: list[ReplayResult]):
    from rich.table import Table
    gpu = name == "virtio-gpu-blobs"
    t = Table(title=f"kvmsim bench replay {name}: per protocol", title_justify="left")
    t.add_column("arch" if gpu else "variant")
    if gpu:
        t.add_column("blob")
    t.add_column("protocol")
    for col in GPU_COLUMNS if gpu else DIRTY_COLUMNS:
        t.add_column(col, justify="right")
    prev = None
    for r in ordered(results):
        if prev is not None and (r.arch, r.variant) != prev:
            t.add_section()
        prev = (r.arch, r.variant)
        head = [r.arch, r.variant] if gpu else [r.variant]
        t.add_row(*head, r.policy, *(gpu_row(r) if gpu else dirty_row(r)))
    return t


def header_lines(name: str, summary: str, results: list[ReplayResult]) -> list[str]:
    """The replay, its parameters (once per distinct set, naming the variants that use it) and sources."""
    lines = [f"{name}: {summary}"]
    params: dict[str, list[str]] = {}
    sources: list[str] = []
    for r in results:
        v = params.setdefault(_human(r.params), [])
        if r.variant not in v:
            v.append(r.variant)
        sources += [s for s in r.sources if s not in sources]
    for p, variants in params.items():
        lines.append(f"  parameters{'' if len(params) == 1 else ' (' + ', '.join(variants) + ')'}: {p}")
    lines += [f"  source: {s}" for s in sources]
    return lines


def to_json(name: str, results: list[ReplayResult], options: dict) -> dict:
    return {"schema": SCHEMA, "replay": name, "options": options,
            "pages_lost": sum(r.pages_lost for r in results), "runs": [r.to_json() for r in results]}


def plot(name: str, results: list[ReplayResult], path: str) -> None:
    """Grouped bars, one group per (arch, variant), one bar per protocol: the counters a VMM engineer
    compares (dirty-tracking replays: pages sent, faults, TLB flushes, set_dirty, mark_accessed, wall;
    blobs: EFAULT exits, foreign refs, get_page, set_dirty, faults)."""
    from kvmsim.bench.report import _pyplot
    import numpy as np
    plt = _pyplot()
    gpu = name == "virtio-gpu-blobs"
    rs = ordered(results)
    groups: list[tuple] = []
    for r in rs:
        if (r.arch, r.variant) not in groups:
            groups.append((r.arch, r.variant))
    policies = list(dict.fromkeys(r.policy for r in rs))
    if gpu:
        keys = [("efault", lambda r: r.extra["efault"]), ("foreign refs", lambda r: r.extra["foreign_refs"]),
                ("get_page", lambda r: r.counters.get("get_page", 0)),
                ("set_dirty", lambda r: r.counters.get("set_dirty", 0)), ("faults", lambda r: r.faults)]
    else:
        keys = [("pages sent", lambda r: r.pages_sent), ("pages lost", lambda r: r.pages_lost),
                ("faults", lambda r: r.faults), ("tlb_flush", lambda r: r.counters.get("tlb_flush", 0)),
                ("set_dirty", lambda r: r.counters.get("set_dirty", 0)),
                ("mark_accessed", lambda r: r.counters.get("mark_accessed", 0)),
                ("wall s", lambda r: r.wall_seconds)]
    if not gpu:
        fig, axes = plt.subplots(len(keys) + 1, 1, figsize=(max(8, len(groups) * 1.2), 2.2 * (len(keys) + 1)))
        for r in rs:                                        # convergence: pages reported per pass
            its = [it.index for it in r.per_iteration]
            axes[0].plot(its, [max(1, it.reported) for it in r.per_iteration], marker="o",
                         label=f"{r.variant} {r.policy}")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("pass", fontsize="small")
        axes[0].set_ylabel("pages reported", fontsize="small")
        axes[0].legend(fontsize="x-small")
        axes[0].set_title(f"kvmsim bench replay {name}")
        axes = axes[1:]
    else:
        fig, axes = plt.subplots(len(keys), 1, figsize=(max(8, len(groups) * 1.2), 2.2 * len(keys)), sharex=True)
        axes[0].set_title(f"kvmsim bench replay {name}")
    x = np.arange(len(groups))
    w = 0.8 / max(1, len(policies))
    for k, pol in enumerate(policies):
        by = {(r.arch, r.variant): r for r in rs if r.policy == pol}
        for ax, (label, get) in zip(axes, keys):
            ax.bar(x + k * w, [get(by[g]) if g in by else 0 for g in groups], w, label=pol)
            ax.set_ylabel(label, fontsize="small")
    axes[0].legend(fontsize="small")
    labels = [f"{a}/{v}" if gpu else v for a, v in groups]
    for ax in axes:
        ax.set_xticks(x + w * (len(policies) - 1) / 2, labels if ax is axes[-1] else [""] * len(labels),
                      rotation=30, ha="right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
