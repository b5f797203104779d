"""``kvmsim conform``: the conformance suite against this host's /dev/kvm, as a table."""

from __future__ import annotations

import json
import platform
import sys

import click

from kvmsim.cli import cli


def _fmt(v) -> str:
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


@cli.command("conform")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: host, capabilities, rows.")
@click.option("--group", multiple=True, help="Only these case groups (memslot, access, dirty, ring, hostop, pfncache, gmem).")
def conform_cmd(as_json: bool, group: tuple[str, ...]) -> None:
    """Run the conformance suite on the model and the real /dev/kvm and compare."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from kvmsim.backend.conformance import CASES, model_backend, real_backend, run_suite

    real, why = real_backend()
    if real is None:
        msg = f"kvmsim conform: cannot run against the real KVM: {why}"
        if as_json:
            click.echo(json.dumps({"host": platform.release(), "error": msg}))
        else:
            click.echo(msg, err=True)
        sys.exit(2)
    cases = [c for c in CASES if not group or c.group in group]
    model = model_backend(real.policy if real.policy in ("legacy", "series") else "series")
    caps = getattr(real, "capabilities", lambda: {})()
    console = Console(stderr=as_json)
    try:
        with Progress(console=console, transient=True, disable=as_json) as prog:
            task = prog.add_task("conformance", total=len(cases))
            rows = run_suite([model, real], cases, progress=lambda r: prog.advance(task))
    finally:
        real.close()
        model.close()
    ran = [r for r in rows if r.agree is not None]
    skipped = [r for r in rows if r.agree is None]
    bad = [r for r in ran if not r.agree]
    if as_json:
        click.echo(json.dumps({
            "host": platform.release(), "policy": real.policy, "capabilities": caps,
            "cases": len(rows), "agree": len(ran) - len(bad), "disagree": len(bad),
            "rows": [{"case": r.case, "group": r.group, "model": repr(r.results[model.name]),
                      "real": repr(r.results[real.name]), "agree": r.agree} for r in rows],
        }, default=str))
    else:
        console.print(f"host kernel {platform.release()}, policy {real.policy} (from the kernel version; "
                      "the series added no capability to probe)")
        if caps:
            console.print("capabilities: " + ", ".join(f"{k}={v}" for k, v in caps.items()))
        t = Table("case", "model", "real", "agree")
        for r in rows:
            mark = "[green]yes[/]" if r.agree else ("[yellow]skip[/]" if r.agree is None else "[red]NO[/]")
            t.add_row(r.case, _fmt(r.results[model.name]), _fmt(r.results[real.name]), mark)
        console.print(t)
        console.print(f"{len(ran)} cases run, {len(ran) - len(bad)} agree, {len(bad)} disagree, {len(skipped)} skipped")
        for r in skipped:
            console.print(f"  skipped {r.case}: {r.results[real.name]}")
    sys.exit(1 if bad else 0)
