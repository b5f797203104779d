"""``kvmsim oracle``: real kernels (v6.12, v6.13) booted under QEMU/TCG as the oracle for the model's
hardware mode (kvmsim.backend.oracle)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kvmsim.cli import cli, handle_errors


@cli.group("oracle")
def oracle_group() -> None:
    """Hold the model against real kernels with real stage-2 (NPT) faults, booted under QEMU."""


@oracle_group.command("setup")
@click.option("--debian-kernel", "debian_dir", type=click.Path(file_okay=False), default=None,
              help="Also apt-get download Debian's linux-image-6.12.*+deb12-amd64 into DIR and unpack it (dpkg -x).")
@click.option("--package", default=None, help="The Debian kernel package to fetch (default: the newest).")
@handle_errors
def setup_cmd(debian_dir: str | None, package: str | None) -> None:
    """Install qemu-system-x86 and busybox-static when missing (apt-get; needs root)."""
    from kvmsim.backend.oracle.setup import ensure_packages, fetch_debian_kernel
    installed = ensure_packages(log=lambda m: click.echo(m, err=True))
    click.echo("installed: " + ", ".join(installed) if installed else "qemu-system-x86 and busybox-static: present")
    if debian_dir:
        k = fetch_debian_kernel(debian_dir, package, log=lambda m: click.echo(m, err=True))
        click.echo(f"{k.package}: kernel {k.image} (release {k.release}); initramfs modules:")
        for m in k.modules:
            click.echo(f"  {m}")


@oracle_group.command("build-kernel")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Copy the bzImage here as bzImage-<release>.")
@click.option("-j", "--jobs", type=int, default=None)
@click.option("--dry-run", is_flag=True, help="Print the commands only.")
@handle_errors
def build_kernel_cmd(src: str, out: str | None, jobs: int | None, dry_run: bool) -> None:
    """Build an oracle kernel from the kernel tree SRC with the shipped config fragment."""
    from kvmsim.backend.oracle.setup import build_kernel
    cmds = build_kernel(src, out, jobs=jobs, dry_run=dry_run, log=lambda m: click.echo(m, err=True))
    if dry_run:
        for c in cmds:
            click.echo(" ".join(c))


def _short(d: dict) -> str:
    """A one-line summary of one side's compared values: the phases with counted keys."""
    parts = []
    for phase, vals in d.items():
        kv = [f"{k}={v}" for k, v in vals.items() if k != "out"]
        if kv:
            parts.append(f"{phase}: " + " ".join(kv))
    s = "; ".join(parts) or "outcomes only"
    return s if len(s) <= 70 else s[:67] + "..."


@oracle_group.command("run")
@click.option("--kernel", "kernels", multiple=True, type=click.Path(),
              help="A bzImage (repeatable); default: every bzImage-* in $KVMSIM_ORACLE_KERNELS or ../shared/oracle.")
@click.option("--json", "as_json", is_flag=True, help='{"kernels": [{"release", "policy", "cases": [...]}]}')
@click.option("--save", type=click.Path(file_okay=False), default=None,
              help="Keep each kernel's raw results as DIR/results-<release>.json.")
@click.option("--recorded", type=click.Path(exists=True, file_okay=False), default=None,
              help="Reuse DIR/results-<release>.json instead of booting (the model side still runs).")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds per boot.")
@handle_errors
def run_cmd(kernels: tuple[str, ...], as_json: bool, save: str | None, recorded: str | None, timeout: float) -> None:
    """Boot each kernel once, run the hardware-mode suite in it and on the model, compare."""
    from rich.console import Console
    from rich.table import Table

    from kvmsim.backend.oracle.boot import BootConfig, OracleError
    from kvmsim.backend.oracle.kernels import default_kernel_dir, find_kernels
    from kvmsim.backend.oracle.run import run_kernel

    found = find_kernels(list(kernels) or None)
    if not found:
        click.echo(f"kvmsim oracle run: no kernel images (bzImage-*) in {default_kernel_dir()}; "
                   "pass --kernel IMAGE or set KVMSIM_ORACLE_KERNELS", err=True)
        sys.exit(2)
    console = Console(stderr=as_json)
    console.width = max(console.width, 160)
    runs, failed = [], []
    for k in found:
        rec = None
        if recorded:
            p = Path(recorded) / f"results-{k.release}.json"
            if not p.exists():
                click.echo(f"kvmsim oracle run: no recorded results {p}", err=True)
                sys.exit(2)
            rec = json.loads(p.read_text())
        console.print(f"[bold]{k.release}[/] ({k.policy}): {'recorded results' if rec else 'booting ' + str(k.path)}")
        try:
            run = run_kernel(k, results_from=rec, config=BootConfig(timeout=timeout))
        except OracleError as e:
            console.print(f"[red]{k.release}: {e}[/]")
            failed.append({"release": k.release, "policy": k.policy, "error": str(e), "cases": []})
            continue
        if save:
            Path(save).mkdir(parents=True, exist_ok=True)
            (Path(save) / f"results-{k.release}.json").write_text(json.dumps(run.results, indent=1, sort_keys=True))
        runs.append(run)
        if not as_json:
            t = Table("case", "group", "model", "real", "agree", title=f"{k.release} ({k.policy})")
            for r in run.rows:
                mark = "[green]yes[/]" if r.agree else ("[yellow]skip[/]" if r.agree is None else "[red]NO[/]")
                if r.agree is False and r.diffs:
                    ph, key, m, rv = r.diffs[0]
                    t.add_row(r.case, r.group, f"{ph}: {key}={m}"[:70], f"{ph}: {key}={rv}"[:70], mark)
                elif r.agree is False:
                    t.add_row(r.case, r.group, "", r.note[:70], mark)
                else:
                    t.add_row(r.case, r.group, _short(r.model), _short(r.real) if r.agree else r.note[:70], mark)
            console.print(t)
            n = len(run.rows)
            console.print(f"{k.release}: {run.agree} of {n} agree, {run.disagree} disagree, "
                          f"{n - run.agree - run.disagree} skipped; boot+agent {run.boot_seconds:.1f} s "
                          f"(agent {run.agent_seconds:.1f} s, {n / max(run.agent_seconds, 1e-9):.2f} cases/s), "
                          f"model {run.model_seconds:.1f} s; absent functions: {', '.join(sorted(run.results.get('absent', {})))}")
    if as_json:
        click.echo(json.dumps({"kernels": [r.to_json() for r in runs] + failed}, default=str))
    sys.exit(1 if failed or any(r.disagree for r in runs) else 0)
