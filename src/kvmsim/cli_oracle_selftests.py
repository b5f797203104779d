"""``kvmsim oracle selftests``: the kernel's own KVM selftests (tools/testing/selftests/kvm/) inside each
oracle kernel, one boot per kernel (:mod:`kvmsim.backend.oracle.selftests`).  Registered on the
``oracle`` group when one exists, else on the main group as ``kvmsim selftests``."""

from __future__ import annotations

import importlib
import json
import sys

import click

from kvmsim.cli import cli
from kvmsim.errors import KvmsimError

try:                                        # the oracle group, if its module is there
    importlib.import_module("kvmsim.cli_oracle")
except ImportError:
    pass
_group = cli.commands.get("oracle")
_parent = _group if isinstance(_group, click.Group) else cli

_STYLE = {"pass": "green", "skip": "yellow", "fail": "red", "timeout": "red", "missing": "yellow", "not run": "red"}


@_parent.command("selftests")
@click.option("--kernel", "kernels", multiple=True, type=click.Path(dir_okay=False),
              help="A bzImage (repeatable); default: every bzImage-* in ../shared/oracle or $KVMSIM_ORACLE_KERNELS.")
@click.option("--only", "only", multiple=True, help="Run only the selftests with this name (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: {\"kernels\": [...]}.")
def selftests_cmd(kernels, only, as_json) -> None:
    """Run the KVM selftests (dirty_log_test, the page-splitting and memslot tests, mmu stress,
    guest_memfd, pre-fault, ...) inside each oracle kernel; pass/skip/fail per selftest."""
    from rich.console import Console
    from rich.table import Table

    from kvmsim.backend.oracle.boot import qemu_binary
    from kvmsim.backend.oracle.kernels import find_kernels
    from kvmsim.backend.oracle.selftests import SELFTESTS, run_selftests

    console = Console(stderr=as_json)
    try:
        found = find_kernels(list(kernels) or None)
        if not found:
            raise KvmsimError("no oracle kernels found (give --kernel or set KVMSIM_ORACLE_KERNELS)")
        if qemu_binary() is None:
            raise KvmsimError("qemu-system-x86_64 not found: install qemu-system-x86 (`kvmsim oracle setup`)")
        known = {t.name for t in SELFTESTS}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise KvmsimError(f"--only: no selftest named {', '.join(map(repr, unknown))}; "
                              f"choose from {', '.join(sorted(known))}")
        tests = tuple(t for t in SELFTESTS if not only or t.name in only)
        results = []
        for k in found:
            console.print(f"booting {k.path.name} ({k.release}, {k.policy}) for {len(tests)} selftests ...",
                          highlight=False)
            results.append(run_selftests(k, tests))
    except KvmsimError as e:
        if as_json:
            click.echo(json.dumps({"error": str(e)}))
        else:
            click.echo(f"kvmsim {'oracle ' if _parent is not cli else ''}selftests: {e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({"kernels": [r.to_json() for r in results]}, indent=1))
    else:
        for r in results:
            t = Table(title=f"{r.release} ({r.policy}): {r.selftest_dir or '-'}", title_justify="left")
            for c in ("selftest", "outcome", "seconds", "detail"):
                t.add_column(c, justify="right" if c == "seconds" else "left")
            for o in r.outcomes:
                t.add_row(o.name, f"[{_STYLE.get(o.outcome, '')}]{o.outcome}[/]", f"{o.seconds:.1f}", o.detail)
            console.print(t)
            if r.error:
                console.print(f"[red]{r.release}: {r.error}[/red]")
            if r.note:
                console.print(f"note: {r.note}", highlight=False)
            for b in r.boots:
                console.print(f"{r.release}: {b['cpus']}-CPU boot, {b['seconds']:.1f} s wall, guest uptime "
                              f"{b['uptime'] or 0:.1f} s ({len(b['selftests'])} selftests)", highlight=False)
    bad = any(r.error or any(o.outcome in ("fail", "timeout", "not run") for o in r.outcomes) for r in results)
    sys.exit(1 if bad else 0)
