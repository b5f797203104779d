"""``kvmsim explore``: explore interleavings of a built-in race (kvmsim.explore).

Exit status: 0 the search finished (a violation found, or none: a complete DFS, every random
schedule asked for, the replay); 3 the DFS hit ``--max-schedules`` before it finished and found
nothing, so "no violation" is not established; 2 bad input.
"""

from __future__ import annotations

import json
import sys

import click

from kvmsim.cli import cli, policy_option
from kvmsim.errors import KvmsimError
from kvmsim.kvm.arch import ARCH_NAMES
from kvmsim.explore import (MAX_SCHEDULES, MUTATIONS, SCENARIOS, Coverage, Mutations, explore, format_schedule,
                            parse_schedule)

#: ``kvmsim explore`` exit status when a DFS was truncated and found no violation.
EXIT_INCOMPLETE = 3


def _result_dict(name, policy, muts, res, bound, mode, arch) -> dict:
    out = {"scenario": name, "arch": arch, "policy": policy, "mutations": muts.names(), "mode": mode, "bound": bound,
           "explored": res.explored, "seconds": round(res.elapsed, 4),
           "schedules_per_second": round(res.rate, 1),
           "coverage": res.coverage.value, "complete": res.complete, "coverage_note": res.why(),
           "max_schedules": res.max_schedules, "unexplored_prefixes": res.pending,
           "violation": None}
    if res.violating is not None:
        out["violation"] = res.violating.violation.as_dict()
        out["schedule"] = format_schedule(res.shortest)
        out["steps"] = [{"thread": s.thread, "label": s.label} for s in res.violating.steps]
    return out


def _list_races(as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([{"name": s.name, "description": s.doc, "arches": list(s.arches)}
                               for s in SCENARIOS.values()], indent=2))
        return
    width = max(len(n) for n in SCENARIOS)
    for s in SCENARIOS.values():
        click.echo(f"{s.name:<{width}}  {s.doc}  [arch: {', '.join(s.arches)}]")
    click.echo(f"\nmutations (--mutate): {', '.join(MUTATIONS)}")


@cli.command("explore", epilog="Exit status: 0 search finished (violation or not), 3 DFS truncated at "
                               "--max-schedules with no violation found, 2 bad input.")
@click.argument("name", required=False)
@click.option("--list", "list_races", is_flag=True, help="list the races (with a line each) and exit")
@policy_option(("legacy", "series", "series-rc1", "current", "both"), default="both", show_default=True,
               help="Policy to explore under (both: legacy then series).")
@click.option("--bound", type=click.IntRange(min=0), default=2, show_default=True, help="preemption bound (DFS)")
@click.option("--max-schedules", type=click.IntRange(min=1), default=MAX_SCHEDULES, show_default=True,
              help="cap on the schedules one DFS runs; a DFS stopped by it is reported as incomplete")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for --random")
@click.option("--random", "random_n", type=click.IntRange(min=1), default=None, help="N random schedules")
@click.option("--replay", default=None, help='a printed schedule, e.g. "vcpu0*4,host"')
@click.option("--mutate", multiple=True, type=click.Choice(list(MUTATIONS)), help="switch a safety mechanism off")
@click.option("--arch", type=click.Choice(["generic", *(a for a in ARCH_NAMES if a != "generic")]),
              default=None, help="stage-2 MMU the race runs on  [default: the race's own: generic, or the one arch it lists]")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def explore_cmd(name, list_races, policy, bound, max_schedules, seed, random_n, replay, mutate, arch,
                as_json) -> None:
    """Explore interleavings of race NAME (see --list); print the shortest violating schedule, if any."""
    if list_races:
        _list_races(as_json)
        return
    if name is None or name not in SCENARIOS:
        msg = f"unknown race {name!r}; " if name else "missing race name; "
        raise click.UsageError(msg + "choose one of: " + ", ".join(SCENARIOS) + " (kvmsim explore --list)")
    if replay is not None and random_n is not None:
        raise click.UsageError("--replay and --random are exclusive")
    try:
        sched = parse_schedule(replay) if replay is not None else None
        muts = Mutations.parse(mutate)
        scenario = SCENARIOS[name].on(arch or SCENARIOS[name].arch)
        arch = scenario.arch
    except KvmsimError as e:
        raise click.UsageError(str(e)) from None
    mode = "replay" if sched is not None else f"random({random_n}, seed={seed})" if random_n else f"dfs(bound={bound})"
    results, incomplete = [], False
    for pol in (["legacy", "series"] if policy == "both" else [policy]):
        kw = dict(bound=bound, random_n=random_n, seed=seed, replay=sched, max_schedules=max_schedules)
        try:
            if as_json or not sys.stderr.isatty():
                res = explore(scenario, pol, muts, **kw)
            else:
                from rich.progress import Progress
                with Progress(transient=True) as prog:
                    task = prog.add_task(f"{name} [{pol}]", total=None)
                    res = explore(scenario, pol, muts, progress=lambda n: prog.update(task, completed=n), **kw)
        except KvmsimError as e:
            raise click.UsageError(str(e)) from None
        incomplete |= res.coverage is Coverage.TRUNCATED and res.violating is None
        results.append(_result_dict(name, pol, muts, res, bound, mode, arch))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        sys.exit(EXIT_INCOMPLETE if incomplete else 0)
    for r in results:
        muts_s = ",".join(r["mutations"]) or "none"
        click.echo(f"{r['scenario']} [{r['policy']}, {r['arch']}] mutations={muts_s} {r['mode']}: {r['explored']} schedules "
                   f"in {r['seconds']:.2f}s ({r['schedules_per_second']:.0f} schedules/s)")
        v = r["violation"]
        if v is None:
            if r["coverage"] == Coverage.COMPLETE.value:
                click.echo(f"  no violation up to bound {bound} (search complete)")
            else:
                click.echo(f"  no violation found; {r['coverage_note']}")
            continue
        click.echo(f"  VIOLATION {v['invariant']}: {v['detail']}")
        click.echo(f"  shortest schedule: {r['schedule']}")
        for i, s in enumerate(r["steps"], 1):
            click.echo(f"  {i:3d} {s['thread']:>8} | {s['label']}")
    if incomplete:
        click.echo(f"kvmsim explore: search incomplete, no violation found (exit {EXIT_INCOMPLETE})", err=True)
    sys.exit(EXIT_INCOMPLETE if incomplete else 0)
