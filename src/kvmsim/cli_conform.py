"""``kvmsim conform``: the conformance suite against this host's /dev/kvm, as a table."""

from __future__ import annotations

import json
import platform
import sys

import click

from kvmsim.cli import cli


def known_groups() -> list[str]:
    """The case groups, in suite order."""
    from kvmsim.backend.conformance import CASES
    return list(dict.fromkeys(c.group for c in CASES))


def _groups(ctx, param, value: tuple[str, ...]) -> set[str]:
    """``--group a --group b`` or ``--group a,b``; an unknown name is a usage error (exit 2)."""
    known = known_groups()
    out: set[str] = set()
    for part in (p.strip() for v in value for p in v.split(",")):
        if not part:
            raise click.BadParameter(f"empty group name in {','.join(value)!r}; known groups: {', '.join(known)}")
        if part not in known:
            raise click.BadParameter(f"unknown group {part!r}; known groups: {', '.join(known)}")
        out.add(part)
    return out


@cli.command("conform")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: host, capabilities, rows.")
@click.option("--group", multiple=True, callback=_groups, metavar="GROUP[,GROUP...]",
              help="Only these case groups (memslot, access, dirty, ring, hostop, pfncache, gmem); "
                   "repeat the option or give a comma-separated list.")
def conform_cmd(as_json: bool, group: set[str]) -> None:
    """Run the conformance suite on the model and the real /dev/kvm and compare.

    Values are printed readably: errnos by name (``ok`` for 0), guest exits by name, ``yes``/``no``.
    Exit status: 0 every case agrees, 1 a disagreement, 2 bad input or no usable /dev/kvm."""
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    from kvmsim.backend.conformance import CASES, format_value, json_value, model_backend, real_backend, run_suite
    from kvmsim.console import make_console

    real, why = real_backend()
    if real is None:
        msg = f"kvmsim conform: cannot run against the real KVM: {why}"
        if as_json:
            click.echo(json.dumps({"host": platform.release(), "error": msg}))
        else:
            click.echo(msg, err=True)
        sys.exit(2)
    cases = [c for c in CASES if not group or c.group in group]
    from kvmsim.backend.conformance import host_protocol
    protocol = host_protocol(platform.release())
    model = model_backend(protocol)
    caps = getattr(real, "capabilities", lambda: {})()
    console = make_console(stderr=as_json)
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
            "host": platform.release(), "policy": real.policy, "protocol": protocol, "capabilities": caps,
            "cases": len(rows), "agree": len(ran) - len(bad), "disagree": len(bad),
            "rows": [{"case": r.case, "group": r.group, "model": json_value(r.results[model.name]),
                      "real": json_value(r.results[real.name]), "agree": r.agree} for r in rows],
        }, default=str))
    else:
        console.print(f"host kernel {platform.release()}: the model runs protocol {protocol} (>= 6.14 current, "
                      f"6.13 series, <= 6.12 legacy); refcounting policy {real.policy} (from the kernel version; "
                      "the series added no capability to probe)")
        if caps:
            console.print("capabilities: " + ", ".join(f"{k}={v}" for k, v in caps.items()))
        t = Table("case", "model", "real", "agree")
        t.columns[0].no_wrap = True
        for r in rows:
            mark = "[green]yes[/]" if r.agree else ("[yellow]skip[/]" if r.agree is None else "[red]NO[/]")
            t.add_row(escape(r.case), escape(format_value(r.results[model.name])),
                      escape(format_value(r.results[real.name])), mark)
        console.print(t)
        console.print(f"{len(ran)} cases run, {len(ran) - len(bad)} agree, {len(bad)} disagree, {len(skipped)} skipped")
        for r in skipped:
            console.print(f"  skipped {escape(r.case)}: {escape(str(r.results[real.name]))}", soft_wrap=True)
    sys.exit(1 if bad else 0)
