"""``kvmsim bench``: benchmarks of the model; ``kvmsim bench dirty-log`` is dirty_log_perf_test
(tools/testing/selftests/kvm/dirty_log_perf_test.c) on the model, the real /dev/kvm, or both.

Everything is checked before the first run: the options, the ``--plot`` path and format, and the
memory each run needs against MemAvailable.  Exit status: 0 done, 2 bad input or a run that failed
cleanly, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); the worker process is stopped either way.
"""

from __future__ import annotations

import json
import sys
import time

import click

from kvmsim.cli import cli, policy_option
from kvmsim.errors import KvmsimError, UsageError

BACKINGS = ("anonymous", "anonymous_thp", "anonymous_hugetlb", "anonymous_hugetlb_2mb",
            "anonymous_hugetlb_1gb", "shmem", "shared_hugetlb")


def _sizes(ctx, param, value):
    """``-b 1G`` or a comma-separated list, ``-b 1G,4G,16G``: one run per size."""
    from kvmsim.bench.memstress import parse_size
    out = []
    for part in str(value).split(","):
        try:
            out.append(parse_size(part))
        except UsageError as e:
            raise click.BadParameter(str(e)) from None
    if len(set(out)) != len(out):
        raise click.BadParameter(f"size list {value!r} names a size twice")
    return sorted(out)


@cli.group("bench")
def bench() -> None:
    """Benchmarks of the model at guest scale (timings plus cost counters)."""


@bench.command("dirty-log")
@click.option("-b", "vcpu_memory", default="1G", callback=_sizes, show_default=True,
              help="Guest memory per vCPU ([0-9]+[kmgt]); a comma-separated list runs each size.")
@click.option("-v", "vcpus", default=1, show_default=True, type=click.IntRange(1, 4096),
              help="vCPUs (1..KVM_MAX_VCPUS, 4096 on x86).")
@click.option("-i", "iterations", default=2, show_default=True, type=click.IntRange(2, 2**31 - 1),
              help="Dirty/get/clear iterations (>= 2).")
@click.option("-s", "backing", default="anonymous", show_default=True, type=click.Choice(BACKINGS),
              help="Backing source.")
@click.option("-w", "write_percent", default=100, show_default=True, type=click.IntRange(0, 100),
              help="Percentage of pages written per pass.")
@click.option("-x", "slots", default=1, show_default=True, type=click.IntRange(1), help="Memslots.")
@click.option("-g", "no_manual_protect", is_flag=True,
              help="Do not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (default: ENABLE|INITIALLY_SET).")
@click.option("-e", "run_while_disabling", is_flag=True,
              help="vCPUs keep dirtying memory while dirty logging is disabled.")
@click.option("-r", "seed", default=1, show_default=True, type=click.IntRange(1, 2**31 - 1),
              help="Random seed (for -w < 100), positive as the selftest's atoi_positive.")
@policy_option(("legacy", "series", "current", "both"), default="both", show_default=True,
               help="Policy of the model runs (both: legacy then series).")
@click.option("--v613-other", is_flag=True,
              help="Also the other 6.13 MMU changes (batched flush, in-place huge page recovery, ...).")
@click.option("--backend", type=click.Choice(["model", "kvm", "both", "oracle"]), default="model", show_default=True,
              help="The model, the real /dev/kvm (<= 1 GiB: every guest write is emulated), or both; oracle: "
                   "the real dirty_log_perf_test in each oracle kernel (QEMU/TCG), kprobes per phase beside the model.")
@click.option("--kernel", "kernels", multiple=True, type=click.Path(dir_okay=False),
              help="--backend oracle: a bzImage (repeatable; default: every shipped oracle kernel).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every run.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a plot of phase times and counters; the extension picks the format (.png, .svg, .pdf).")
@click.option("--progress/--no-progress", default=None,
              help="Per-phase progress on stderr (default: when stderr is a terminal and not --json).")
@click.option("--html", "html_file", type=click.Path(), default=None,
              help="Also write the model runs as one self-contained HTML page: range lanes per phase, "
                   "per-phase counters, policies side by side (docs/html.md).")
@click.option("--no-isolate", is_flag=True, help="Run model runs in this process (peak RSS is then shared).")
@click.option("--no-warmup", is_flag=True,
              help="Skip writing the run's memory once before it (on a VM host, first touches then count).")
def dirty_log_cmd(vcpu_memory, vcpus, iterations, backing, write_percent, slots, no_manual_protect,
                  run_while_disabling, seed, policy, v613_other, backend, as_json, plot_path, progress,
                  no_isolate, no_warmup, kernels, html_file) -> None:
    """dirty_log_perf_test on the model: phase times plus struct-page, SPTE, TLB and fault counts."""
    if backend == "oracle":
        from kvmsim.bench.oracle import oracle_main
        sys.exit(oracle_main(click.get_current_context(), kernels, as_json))
    try:
        _dirty_log(vcpu_memory, vcpus, iterations, backing, write_percent, slots, no_manual_protect,
                   run_while_disabling, seed, policy, v613_other, backend, as_json, plot_path, progress,
                   no_isolate, no_warmup, html_file)
    except KeyboardInterrupt:
        click.echo("\nkvmsim bench dirty-log: interrupted; the worker was stopped", err=True)
        sys.exit(130)


class PhaseProgress:
    """Per-phase progress on stderr.  On a terminal the running phase stays on one line (rewritten);
    every finished phase gets its own line with its time."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def run(self, tag: str):
        from kvmsim.bench.report import phase_label

        def report(name: str, iteration: int | None, seconds: float | None) -> None:
            label = "warming up memory" if name == "warm-up" else phase_label(name, iteration)
            if seconds is None:
                if self.tty:
                    self.stream.write(f"\r\x1b[K{tag}: {label} ...")
                    self.stream.flush()
                return
            self.stream.write(("\r\x1b[K" if self.tty else "") + f"{tag}: {label} {seconds:.3f} s\n")
            self.stream.flush()
        return report

    def note(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _dirty_log(vcpu_memory, vcpus, iterations, backing, write_percent, slots, no_manual_protect,
               run_while_disabling, seed, policy, v613_other, backend, as_json, plot_path, progress,
               no_isolate, no_warmup, html_file=None) -> None:
    from kvmsim.bench.dirty_log_perf import (BASE_BYTES, Options, check_memory, estimate_bytes, run_model,
                                             run_model_isolated, run_with_timeline)
    from kvmsim.bench.real import check_real, real_estimate_bytes, run_real
    from kvmsim.bench.report import (check_plot_path, compare_table, cost_table, floor_line, plot,
                                     scaling_table, selftest_lines, size_name)
    from kvmsim.console import make_console

    sizes = vcpu_memory
    all_opts = [Options(b, vcpus, iterations, backing, write_percent, slots, not no_manual_protect,
                        run_while_disabling, seed, v613_other, floor=True) for b in sizes]
    policies = ["legacy", "series"] if policy == "both" else [policy]
    console = make_console(stderr=as_json)           # whole tables when piped
    if progress is None:
        progress = sys.stderr.isatty() and not as_json
    shown = PhaseProgress() if progress else None
    results, reals, real_errors = [], {}, {}
    try:
        if plot_path:
            check_plot_path(plot_path)
        if html_file:
            check_html_path(html_file, backend)
        for opts in all_opts:                          # everything is checked before the first run
            opts.check()
            what = f"-b {size_name(opts.vcpu_memory)} -v {opts.vcpus}"
            if backend in ("model", "both"):
                check_memory(estimate_bytes(opts) + (0 if no_isolate else BASE_BYTES), f"the model run {what}")
            if backend == "kvm" or (backend == "both" and _real_ok(check_real, opts, real_errors)):
                check_real(opts)
                check_memory(real_estimate_bytes(opts), f"the real /dev/kvm run {what}")
        for opts in all_opts:
            sz = f" -b {size_name(opts.vcpu_memory)}"
            if backend in ("kvm", "both") and opts.vcpu_memory not in real_errors:
                t0 = time.perf_counter()
                try:
                    reals[opts.vcpu_memory] = run_real(opts, progress=shown and shown.run(f"kvm{sz}"))
                except KvmsimError as e:
                    real_errors[opts.vcpu_memory] = str(e)
                    if backend == "kvm":
                        raise
                if shown:
                    shown.note(f"kvm{sz}: done in {time.perf_counter() - t0:.2f} s")
            if backend in ("model", "both"):
                for p in policies:
                    t0 = time.perf_counter()
                    report = shown and shown.run(f"model {p}{sz}")
                    if no_isolate:
                        results.append(run_with_timeline(opts, p, report) if html_file else run_model(opts, p, report))
                    else:
                        results.append(run_model_isolated(opts, p, warm=not no_warmup, progress=report,
                                                          html=bool(html_file)))
                    if shown:
                        shown.note(f"model {p}{sz}: done in {time.perf_counter() - t0:.2f} s")
    except KvmsimError as e:
        if as_json:
            click.echo(json.dumps({"error": str(e)}))
        else:
            click.echo(f"kvmsim bench dirty-log: {e}", err=True)
        sys.exit(2)
    everything = results + list(reals.values())
    if as_json:
        errors = {size_name(b): msg for b, msg in real_errors.items()}
        click.echo(json.dumps({"runs": [r.to_json() for r in everything],
                               "real_error": "; ".join(f"{k}: {v}" for k, v in errors.items()) or None,
                               "real_errors": errors or None}, indent=1))
    else:
        for opts in all_opts:
            b = opts.vcpu_memory
            mine = [r for r in results if r.options["vcpu_memory"] == b]
            for r in mine + ([reals[b]] if b in reals else []):
                tag = "v6.13 + other 6.13 MMU changes" if v613_other and r.policy == "series" else r.policy
                console.rule(f"{r.backend}: {tag}" + (f", -b {size_name(b)}" if len(sizes) > 1 else ""))
                for line in selftest_lines(r):
                    console.print(line, highlight=False, soft_wrap=True)
                if r.backend == "model":
                    console.print(cost_table(r, f"cost counters per phase ({r.policy})"))
                    console.print(f"whole flow: {r.wall_seconds:.3f} s wall, peak RSS "
                                  f"{r.peak_rss_bytes / 2**30:.2f} GiB, leaves at the end: {r.stats}",
                                  highlight=False, soft_wrap=True)
                    if floor_line(r):
                        console.print(floor_line(r), highlight=False, soft_wrap=True)
                    if v613_other:
                        console.print("note: with the batched flush the kernel also flushes whenever the "
                                      "walk yields (tdp_mmu_iter_cond_resched: need_resched or mmu_lock "
                                      "contention; 76 in 35ef80eb29ab's run); the model never yields, so "
                                      "its disable count is the minimum, one per slot.",
                                      highlight=False, soft_wrap=True)
            if b in reals and mine:
                console.print(compare_table(mine[-1], reals[b]))
            if b in real_errors:
                console.print(f"[yellow]real /dev/kvm side not run for -b {size_name(b)}: "
                              f"{real_errors[b]}[/yellow]")
        if len(sizes) > 1 and results:
            console.print(scaling_table(results))
    if html_file:
        _write_bench_html(html_file, results)
    if plot_path:
        try:
            plot(everything, plot_path)
        except (UsageError, OSError, ValueError) as e:
            click.echo(f"kvmsim bench dirty-log: --plot {plot_path}: {e}", err=True)
            sys.exit(2)


def check_html_path(path: str, backend: str) -> None:
    """Refuse a ``--html`` path before the run: a file name in an existing, writable directory."""
    import os
    if backend not in ("model", "both"):
        raise UsageError(f"--html {path}: the page draws model runs; use --backend model or both")
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"--html {path}: is a directory; name a file")
    if not os.path.isdir(d):
        raise UsageError(f"--html {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"--html {path}: not writable")


def _write_bench_html(path: str, results) -> None:
    from kvmsim.report.html import write_bench_html
    runs = [r.timeline for r in results if r.timeline is not None]
    title = runs[0]["scenario"] if len({d["scenario"] for d in runs}) == 1 else "dirty_log_perf_test"
    try:
        size = write_bench_html(path, title, runs)
    except OSError as e:
        click.echo(f"kvmsim bench dirty-log: --html {path}: cannot write: {e.strerror or e}", err=True)
        sys.exit(2)
    click.echo(f"kvmsim bench dirty-log: wrote {path} ({size} bytes)", err=True)


def _real_ok(check_real, opts, real_errors) -> bool:
    """``--backend both``: a size the real side cannot run is noted and skipped, not an error."""
    try:
        check_real(opts)
        return True
    except KvmsimError as e:
        real_errors[opts.vcpu_memory] = str(e)
        return False



# ---- kvmsim bench replay (kvmsim.bench.replay) --------------------------------------------------------

def _size_opt(ctx, param, value):
    from kvmsim.bench.memstress import parse_size
    if value is None:
        return None
    try:
        return parse_size(value)
    except UsageError as e:
        raise click.BadParameter(str(e)) from None


def _int_list(ctx, param, value):
    try:
        out = tuple(int(x) for x in str(value).split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from None
    return out


@bench.command("replay")
@click.argument("name", required=False)
@click.option("--list", "list_only", is_flag=True, help="List the replays and exit.")
@click.option("--memory", default="1G", callback=_size_opt, show_default=True, help="Guest RAM ([0-9]+[kmgt]).")
@click.option("--hot", default="256M", callback=_size_opt, show_default=True,
              help="The guest's working set (the hot vCPU's region).")
@click.option("--dirty-rate", default="32M", callback=_size_opt, show_default=True,
              help="Bytes per second the guest (hot vCPU) dirties.")
@click.option("--bandwidth", default="128M", callback=_size_opt, show_default=True,
              help="Link bytes per second (QEMU max-bandwidth default MAX_THROTTLE, 128 MiB/s).")
@click.option("--downtime-ms", default=300, show_default=True, type=click.IntRange(1),
              help="QEMU downtime-limit (DEFAULT_MIGRATE_SET_DOWNTIME).")
@click.option("--max-iterations", default=30, show_default=True, type=click.IntRange(1, 10000),
              help="Passes before a non-converging migration is stopped.")
@click.option("--clear-bitmap-shift", default=18, show_default=True, type=int,
              help="QEMU x-clear-bitmap-shift: KVM_CLEAR_DIRTY_LOG chunk of 2^N pages.")
@click.option("--ring-entries", default="4096,65536", callback=_int_list, show_default=True,
              help="qemu-dirty-ring: dirty-ring-size values (entries), comma-separated.")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1, 10000),
              help="snapshot-chain: diff snapshots after the base.")
@click.option("--epoch-seconds", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="snapshot-chain: guest run time per epoch.")
@click.option("--blobs", default=24, show_default=True, type=click.IntRange(1, 100000),
              help="virtio-gpu-blobs: map/unmap cycles per backing and arch.")
@click.option("--arch", "arches", default="x86,arm64,riscv", show_default=True,
              help="virtio-gpu-blobs: arches, comma-separated.")
@click.option("--pml/--no-pml", default=True, show_default=True,
              help="Intel PML (dirty logging clears D bits) or AMD SVM (write-protects: writes fault).")
@click.option("--seed", default=1, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Random seed.")
@click.option("--bug", default=None, help="A deliberately broken harvest (the oracle must catch it): "
              "qemu-precopy send-before-clear|clear-unmasked, ch-precopy clear-after-send, "
              "snapshot-chain resume-before-reset.")
@policy_option(("legacy", "series", "both"), default="both", show_default=True,
               help="Protocol of the runs (both: legacy and series side by side).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every run.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a plot (matplotlib); the extension picks the format (.png, .svg, .pdf).")
def replay_cmd(name, list_only, memory, hot, dirty_rate, bandwidth, downtime_ms, max_iterations,
               clear_bitmap_shift, ring_entries, epochs, epoch_seconds, blobs, arches, pml, seed, bug, policy,
               as_json, plot_path) -> None:
    """Replay a VMM's real workload on the model: pages lost (must be 0) and over-reported, iterations,
    faults, TLB flushes, struct-page operations and time, per protocol.  Exit status 1 when a run lost
    pages, 2 on bad input."""
    from kvmsim.bench.replay import NAMES, ReplayOptions, replays, run_replay
    from kvmsim.bench.replay import report as rp
    if list_only:
        for r in replays().values():
            click.echo(f"{r.name:18} {r.summary}")
        return
    try:
        if name is None:
            raise UsageError(f"name a replay ({', '.join(NAMES)}) or use --list")
        if name not in NAMES:
            raise UsageError(f"unknown replay {name!r}; choose one of {', '.join(NAMES)} (or --list)")
        opts = ReplayOptions(memory, hot, dirty_rate, bandwidth, downtime_ms, max_iterations, clear_bitmap_shift,
                             ring_entries, epochs, epoch_seconds, blobs, tuple(a.strip() for a in arches.split(",")),
                             pml, seed, bug)
        opts.check(name)
        if plot_path:
            from kvmsim.bench.report import check_plot_path
            check_plot_path(plot_path)
        policies = ["legacy", "series"] if policy == "both" else [policy]
        results = []
        for p in policies:
            results += run_replay(name, opts, p)
    except KeyboardInterrupt:
        click.echo(f"\nkvmsim bench replay {name}: interrupted", err=True)
        sys.exit(130)
    except KvmsimError as e:
        if as_json:
            click.echo(json.dumps({"error": str(e)}))
        else:
            click.echo(f"kvmsim bench replay: {e}", err=True)
        sys.exit(2)
    lost = sum(r.pages_lost for r in results)
    if as_json:
        from dataclasses import asdict
        click.echo(json.dumps(rp.to_json(name, results, asdict(opts)), indent=1))
    else:
        from kvmsim.console import make_console
        console = make_console()
        for line in rp.header_lines(name, replays()[name].summary, results):
            console.print(line, highlight=False, soft_wrap=True)
        console.print(rp.table(name, results))
        if lost:
            console.print(f"[red]LOST WRITES: {lost:,} page(s) written by the guest were never reported[/red]")
        elif name != "virtio-gpu-blobs":
            console.print("pages lost: 0 in every run (the oracle checked every page the guest wrote)")
    if plot_path:
        try:
            rp.plot(name, results, plot_path)
        except (UsageError, OSError, ValueError) as e:
            click.echo(f"kvmsim bench replay: --plot {plot_path}: {e}", err=True)
            sys.exit(2)
    if lost:
        sys.exit(1)
