"""``kvmsim patches``: the 85 patches of the series (:mod:`kvmsim.patches`), each with its title, kind,
arch, the one-line legacy → series difference and the bundled scenarios that demonstrate it.

``--check`` runs every demonstrating scenario under legacy and series and shows what differs; it exits 1
when a demonstration shows no difference or a behaviour-changing patch has none (the second list is
what ``tests/test_patches.py`` enforces, minus the patches other work is still modelling).
"""

from __future__ import annotations

import json
import sys

import click

from kvmsim.cli import _console, _text, cli

EXIT_UNDEMONSTRATED = 1


@cli.command("patches")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, a row per patch.")
@click.option("--markdown", is_flag=True, help="The table as Markdown (docs/patches.md).")
@click.option("--check", is_flag=True,
              help="Run each demonstrating scenario under legacy and series and show what differs; exit 1 when "
                   "a demonstration shows no difference or a behaviour change has no demonstration.")
@click.option("--kind", type=click.Choice(["refactor", "behaviour", "api"]), default=None,
              help="Only patches of this kind.")
def patches_cmd(as_json: bool, markdown: bool, check: bool, kind: str | None) -> None:
    """The 85 patches of "KVM: Stop grabbing references to PFNMAP'd pages" and their demonstrations."""
    from kvmsim.patches import Kind, markdown as to_markdown, table
    rows = table(check=check)
    if markdown:
        click.echo(to_markdown(rows), nl=False)
        return
    want = {"refactor": Kind.REFACTOR, "behaviour": Kind.BEHAVIOUR, "api": Kind.API}.get(kind or "")
    shown = [r for r in rows if want is None or r["kind"] == want.label]
    if as_json:
        click.echo(json.dumps(shown, indent=2))
    else:
        from rich.table import Table
        t = Table(show_lines=False)
        for col in ("#", "kind", "arch / area", "title", "scenarios"):
            t.add_column(col)
        for r in shown:
            scen = []
            for n in r["scenarios"]:
                diff = r.get("differences", {}).get(n)
                style = None if diff is None else ("green" if diff else "red")
                scen.append((n + ("" if diff is None else (" ✓" if diff else " ✗ no difference")), style or ""))
            if not r["scenarios"] and r["kind"] == Kind.BEHAVIOUR.label:
                scen = [("none", "red")]
            cells = _text(*[x for i, s in enumerate(scen) for x in ((", ", "") if i else ("", ""), s)])
            t.add_row(str(r["number"]), r["kind"], _text(r["arch"]), _text(r["title"]), cells)
        con = _console()
        con.print(t)
        beh = [r for r in rows if r["kind"] == Kind.BEHAVIOUR.label]
        done = [r for r in beh if r["scenarios"]]
        con.print(f"{len(rows)} patches; {len(done)}/{len(beh)} behaviour changes name a bundled scenario"
                  + (f" (none: {', '.join(str(r['number']) for r in beh if not r['scenarios'])})"
                     if len(done) < len(beh) else ""), markup=False)
    if check:
        bad = [(r["number"], n) for r in rows for n, d in r["differences"].items() if not d]
        missing = [r["number"] for r in rows if r["kind"] == Kind.BEHAVIOUR.label and not r["scenarios"]]
        for num, n in bad:
            click.echo(f"patch {num}: {n} shows no legacy/series difference", err=True)
        if bad or missing:
            sys.exit(EXIT_UNDEMONSTRATED)
