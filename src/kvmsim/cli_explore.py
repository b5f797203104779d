"""``kvmsim explore``: explore interleavings of a built-in race (kvmsim.explore)."""

from __future__ import annotations

import json
import sys

import click

from kvmsim.cli import cli
from kvmsim.errors import KvmsimError
from kvmsim.explore import MUTATIONS, SCENARIOS, Mutations, explore, format_schedule, parse_schedule


def _result_dict(name, policy, muts, res, bound, mode, arch) -> dict:
    out = {"scenario": name, "arch": arch, "policy": policy, "mutations": muts.names(), "mode": mode, "bound": bound,
           "explored": res.explored, "seconds": round(res.elapsed, 4),
           "schedules_per_second": round(res.rate, 1), "violation": None}
    if res.violating is not None:
        out["violation"] = res.violating.violation.as_dict()
        out["schedule"] = format_schedule(res.shortest)
        out["steps"] = [{"thread": s.thread, "label": s.label} for s in res.violating.steps]
    return out


@cli.command("explore")
@click.argument("name", required=False)
@click.option("--policy", type=click.Choice(["legacy", "series", "both"]), default="both", show_default=True)
@click.option("--bound", type=click.IntRange(min=0), default=2, show_default=True, help="preemption bound (DFS)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for --random")
@click.option("--random", "random_n", type=click.IntRange(min=1), default=None, help="N random schedules")
@click.option("--replay", default=None, help='a printed schedule, e.g. "vcpu0*4,host"')
@click.option("--mutate", multiple=True, type=click.Choice(list(MUTATIONS)), help="switch a safety mechanism off")
@click.option("--arch", type=click.Choice(["generic", "x86", "arm64", "riscv"]), default="generic", show_default=True,
              help="stage-2 MMU the race runs on")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def explore_cmd(name, policy, bound, seed, random_n, replay, mutate, arch, as_json) -> None:
    """Explore interleavings of scenario NAME; print the shortest violating schedule, if any."""
    if name is None or name not in SCENARIOS:
        msg = f"unknown scenario {name!r}; " if name else "missing scenario; "
        raise click.UsageError(msg + "choose one of: " + ", ".join(SCENARIOS))
    if replay is not None and random_n is not None:
        raise click.UsageError("--replay and --random are exclusive")
    try:
        sched = parse_schedule(replay) if replay is not None else None
        muts = Mutations.parse(mutate)
        scenario = SCENARIOS[name].on(arch)
    except KvmsimError as e:
        raise click.UsageError(str(e)) from None
    mode = "replay" if sched is not None else f"random({random_n}, seed={seed})" if random_n else f"dfs(bound={bound})"
    results = []
    for pol in (["legacy", "series"] if policy == "both" else [policy]):
        try:
            if as_json or not sys.stderr.isatty():
                res = explore(scenario, pol, muts, bound=bound, random_n=random_n, seed=seed, replay=sched)
            else:
                from rich.progress import Progress
                with Progress(transient=True) as prog:
                    task = prog.add_task(f"{name} [{pol}]", total=None)
                    res = explore(scenario, pol, muts, bound=bound, random_n=random_n, seed=seed,
                                  replay=sched, progress=lambda n: prog.update(task, completed=n))
        except KvmsimError as e:
            raise click.UsageError(str(e)) from None
        results.append(_result_dict(name, pol, muts, res, bound, mode, arch))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        muts_s = ",".join(r["mutations"]) or "none"
        click.echo(f"{r['scenario']} [{r['policy']}, {r['arch']}] mutations={muts_s} {r['mode']}: {r['explored']} schedules "
                   f"in {r['seconds']:.2f}s ({r['schedules_per_second']:.0f} schedules/s)")
        v = r["violation"]
        if v is None:
            click.echo("  no violation" + (f" up to bound {bound}" if r["mode"].startswith("dfs") else ""))
            continue
        click.echo(f"  VIOLATION {v['invariant']}: {v['detail']}")
        click.echo(f"  shortest schedule: {r['schedule']}")
        for i, s in enumerate(r["steps"], 1):
            click.echo(f"  {i:3d} {s['thread']:>8} | {s['label']}")
