"""The ``kvmsim`` command line: scenarios (list, show, run, compare), plus commands other modules add.

``cli`` is a click group; other modules register subcommands with ``@cli.command()`` in their own
``kvmsim.cli_*`` module, imported at the bottom of this file (a missing one is skipped).

Exit codes: 0 every run matched what its scenario states, 1 a mismatch, 2 bad input (a malformed
scenario file is reported as ``file:line: [key] message``, never with a traceback).  A well-formed
file whose set-up the modelled kernel refuses (a memslot ioctl returning an errno) is a run whose
verdict is ``error``: a mismatch (1) unless the scenario states ``verdict = "error"`` (0).

Text from a scenario file (names, descriptions, values) is never read as rich markup, and control
characters in it are shown escaped (``\x1b``), never sent to the terminal.  When stdout is not a
terminal (a pipe, a file) tables are as wide as their content: nothing is cut at 80 columns.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import sys

import click

EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
JSON_VIOLATION_CAP = 1000


#: Width of a console that is not a terminal: wide enough that no table row is ever cut.
PIPE_WIDTH = 1 << 14

# C0/C1 controls, DEL, line/paragraph separators and the bidi overrides ("trojan source")
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe(text: object) -> str:
    """``text`` with every control character escaped (``\\x1b``, ``\\u202e``): safe to print."""
    def esc(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    return _UNSAFE.sub(esc, str(text))


def _console(stderr: bool = False):
    """A rich console that reads no markup or emoji codes in what it is given unless told to, and does
    not truncate when it is not writing to a terminal."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    width = None
    if not stream.isatty() and not os.environ.get("COLUMNS"):
        width = PIPE_WIDTH
    return Console(stderr=stderr, highlight=False, soft_wrap=True, emoji=False, width=width)


def _text(*parts):
    """A rich ``Text`` from ``(text, style)`` pairs and plain strings; every part is :func:`safe`."""
    from rich.text import Text
    out = Text()
    for p in parts:
        if isinstance(p, tuple):
            out.append(safe(p[0]), style=p[1])
        else:
            out.append(safe(p))
    return out


def handle_errors(fn):
    """Turn a :class:`KvmsimError` into ``file:line: message`` on stderr and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kvmsim.errors import KvmsimError
        try:
            return fn(*args, **kwargs)
        except KvmsimError as e:
            click.echo(f"kvmsim: error: {safe(e)}", err=True)
            sys.exit(EXIT_BAD_INPUT)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kvmsim")
def cli() -> None:
    """kvmsim: how KVM maps guest memory, legacy (v6.12) vs series (v6.13).

    \b
    Exit status of list, show, run and compare:
      0  every run matched what its scenario states
      1  a mismatch (a set-up the modelled kernel refuses is a run with
         verdict "error": a mismatch unless the file states verdict = "error")
      2  bad input: a scenario file that is malformed, unreadable or names
         something it does not define, reported as file:line: [key] message
    """


# ---- helpers -----------------------------------------------------------------------------------------

def policy_option(choices, *, default=None, help: str = "", show_default: bool = False):
    """``--policy``: one of ``choices`` or a plugin, ``path/to/file.py:ClassName`` / ``module:ClassName``
    (:mod:`kvmsim.policies.plugin`).  A plugin is loaded and checked while the options are parsed (a bad
    one is exit status 2 with what is wrong, naming its file and hook); the value is then its display
    name, which ``get_policy`` finds."""
    def callback(ctx, param, value):
        if value is None or value in choices:
            return value
        from kvmsim.policies.plugin import is_plugin_spec, load_plugin
        from kvmsim.errors import KvmsimError
        if not is_plugin_spec(value):
            raise click.BadParameter(f"{value!r} is not one of {', '.join(map(repr, choices))} "
                                     "nor a plugin (path/to/file.py:ClassName or module:ClassName)")
        try:
            return load_plugin(value)
        except KvmsimError as e:
            raise click.BadParameter(safe(e)) from None
    return click.option("--policy", default=default, callback=callback, show_default=show_default,
                        metavar="[" + "|".join(choices) + "|FILE.py:CLASS|MODULE:CLASS]",
                        help=help + " A plugin FILE.py:CLASS or MODULE:CLASS models your own patch "
                                    "(docs/policies.md, \"Writing your own policy\").")


def _is_plugin(policy: str | None) -> bool:
    from kvmsim.policies import shipped_policies
    from kvmsim.scenarios.spec import POLICY_ALIASES
    return policy is not None and policy not in shipped_policies() and policy not in POLICY_ALIASES


def _inv_summary(by_inv: dict[str, int]) -> str:
    return " ".join(f"{k}×{v}" if v > 1 else k for k, v in by_inv.items()) or "-"


def _key_counters(counters: dict[str, int]) -> str:
    from kvmsim.scenarios.runner import KEY_COUNTERS
    return " ".join(f"{k}={counters[k]}" for k in KEY_COUNTERS if counters.get(k)) or "-"


def run_json(rr) -> dict:
    """The JSON object of one run (see tests/scenarios/test_json_schema.py for its schema)."""
    d = rr.as_dict()
    if len(d["violations"]) > JSON_VIOLATION_CAP:
        d["violations"] = d["violations"][:JSON_VIOLATION_CAP]
        d["violations_truncated"] = True
    d["violations_by_invariant"] = rr.by_invariant()
    d["mismatches"] = rr.mismatches
    return d


def _runs(pairs, *, show_progress: bool, timelines: list | None = None):
    """Run (scenario, policy) pairs with a progress bar on stderr; returns RunResults.  With
    ``timelines`` (a list), each run's ``--html`` timeline data is appended to it, in order."""
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kvmsim.scenarios.runner import run
    out = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=_console(stderr=True), transient=True,
                  disable=not show_progress) as progress:
        for sc, policy in pairs:
            task = progress.add_task(escape(safe(f"{sc.name} [{policy}]")), total=len(sc.steps))
            tick = lambda i, n, t=task: progress.update(t, completed=i)          # noqa: E731
            if timelines is None:
                out.append(run(sc, policy, progress=tick))
            else:
                from kvmsim.report import run_with_timeline
                rr, data = run_with_timeline(sc, policy, progress=tick)
                out.append(rr)
                timelines.append(data)
            progress.remove_task(task)
    return out


def _policies(sc, policy: str | None) -> tuple[str, ...]:
    from kvmsim.scenarios.spec import POLICY_ALIASES
    if policy is None:
        return sc.policies
    return POLICY_ALIASES.get(policy, (policy,))


# ---- list / show ---------------------------------------------------------------------------------------

@cli.command("list")
@handle_errors
def list_cmd() -> None:
    """List the bundled scenarios."""
    from rich.table import Column, Table

    from kvmsim.scenarios import library
    t = Table(Column("scenario", no_wrap=True, min_width=28), Column("policies", no_wrap=True, min_width=22), "steps",
              Column("what it shows", no_wrap=True, overflow="ellipsis"), box=None, header_style="bold")
    for sc in library():
        t.add_row(_text(sc.name), _text(",".join(sc.policies)), str(len(sc.steps)),
                  _text(" ".join(sc.description.split())))
    _console().print(t)


@cli.command()
@click.argument("scenario")
@handle_errors
def show(scenario: str) -> None:
    """Show a scenario (bundled NAME or FILE): description, source, set-up, steps, stated outcome."""
    from kvmsim.scenarios import load_scenario
    sc = load_scenario(scenario)
    con = _console()
    out = lambda *parts: con.print(_text(*parts))                     # noqa: E731
    out((sc.name, "bold"), f"  ({sc.file})" if sc.file else "")
    out(" ".join(sc.description.split()))
    if sc.source:
        out(("source:", "dim"), f" {sc.source}")
    if sc.patches:
        from kvmsim.patches import patch
        for n in sc.patches:
            out(("patch:", "dim"), f" {n} \"{patch(n).title}\"")
    if sc.requires:
        out(("requires:", "dim"), f" {', '.join(sc.requires)}")
    for d in sc.drivers:
        out(f"  driver {d.name}: {d.pfn_class} order={d.order} compound={d.compound} prefault={d.prefault} "
            f"pte_write={d.pte_write} free_rule={d.free_rule}" + (f" size={d.size:#x}" if d.size else ""))
    for v in sc.vmas:
        out(f"  vma {v.name}: {v.kind} {v.size:#x} page_size={v.page_size:#x} prot={v.prot}"
            + (f" driver={v.driver}" if v.driver else ""))
    vm = sc.vm
    paging = f" paging={vm.paging}" if getattr(vm, "paging", "direct") != "direct" else ""
    out(f"  vm: policies={','.join(vm.policies)} arch={vm.arch} mmu={vm.mmu}{paging} execution={vm.execution} "
        f"vcpus={vm.vcpus}" + (f" mutations={','.join(vm.mutations)}" if vm.mutations else ""))
    for s in sc.memslots:
        out(f"  memslot {s.id}: gpa={s.gpa:#x} size={s.size:#x} vma={s.vma}+{s.offset:#x} "
            f"flags={','.join(s.flags) or '-'}")
    for i, st in enumerate(sc.steps, 1):
        out(f"  {i:>2}. {st.describe()}")
        for name, th in st.args.get("threads", {}).items() if st.op == "interleave" else ():
            out(f"        thread {name}: {th.describe()}")
        for who, exp in st.expect.items():
            out(f"        expect{'' if who == '*' else '.' + who}: {_expect_text(exp)}")
    for p, fe in sc.expect.items():
        fields = {"verdict": fe.verdict, "violations": fe.violations, "counters": fe.counters or None}
        out(f"  [expect.{p}] {_expect_text(fields)}")


def _expect_text(exp: dict) -> str:
    """Expectations as the file writes them: ``exit = "ok", violations = [], counters = { ... }``."""
    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_]+", k) else json.dumps(k, ensure_ascii=False)

    def val(v) -> str:
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(k)} = {val(w)}" for k, w in v.items()) + " }" if v else "{}"
        if isinstance(v, bool):
            return str(v).lower()
        return f"{v:#x}" if isinstance(v, int) and v > 255 else str(v)

    def violations(v: dict) -> str:
        if all(w == {"min": 1} for w in v.values()):                 # the list form: ["INV-1", ...]
            return "[" + ", ".join(json.dumps(k) for k in v) + "]"
        return val(v)
    def field(k: str, v) -> str:
        if k == "violations":
            return violations(v)
        if k == "value" and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return f"{v:#x}"                                            # as the step line shows values
        return val(v)
    return ", ".join(f"{k} = {field(k, v)}" for k, v in exp.items() if v is not None) or "-"


# ---- run ---------------------------------------------------------------------------------------------

def _fact_line(f) -> str:
    bits = [f.kind]
    if f.pfn is not None:
        bits.append(f"pfn {f.pfn:#x}")
    if f.gfn is not None:
        bits.append(f"gfn {f.gfn:#x}")
    if f.caller:
        bits.append(f"by {f.caller}")
    if f.source is not None and getattr(f.source, "value", "none") != "none":
        bits.append(f"({f.source.value})")
    if f.kvm:
        bits.append("[KVM" + (", mmu_lock]" if f.locked else "]"))
    extra = {k: v for k, v in f.extra.items() if isinstance(v, (bool, int, str)) and v not in (False, None)}
    if extra:
        bits.append(" ".join(f"{k}={v}" for k, v in extra.items()))
    if f.detail:
        bits.append(f"— {f.detail}")
    return " ".join(bits)


def _print_run(con, rr, *, trace: bool, max_facts: int = 12) -> None:
    out = lambda *parts: con.print(_text(*parts))                     # noqa: E731
    mark = ("✓ matches", "green") if rr.expected_match else ("✗ MISMATCH", "red")
    if not rr.stated:
        mark = ("(no stated outcome)", "dim")
    out((rr.scenario, "bold"), " under ", (rr.policy, "bold"), f": {rr.verdict} {_inv_summary(rr.by_invariant())}  ",
        mark)
    for s in rr.steps:
        err = f" {s.res.errno_name}" if s.res.errno else ""
        val = f" value={s.res.value:#x}" if isinstance(s.res.value, int) and not isinstance(s.res.value, bool) else ""
        out(f"  {s.index:>2}. {s.text}  → {s.res.result}{err}{val}")
        if trace:
            interesting = [f for f in s.facts if f.kind not in ("read", "write")]
            for f in interesting[:max_facts]:
                out(f"        · {_fact_line(f)}")
            if len(interesting) > max_facts:
                out(f"        · … {len(interesting) - max_facts} more facts")
            cs = {k: v for k, v in s.counters.items() if ":" not in k}
            if cs:
                out("        counters: " + " ".join(f"{k}+{v}" for k, v in sorted(cs.items())))
        shown = {}
        for v in s.violations:
            shown.setdefault(v.invariant, []).append(v)
        for vs in shown.values():
            out("        ", (str(vs[0]), "yellow"), f" (+{len(vs) - 1} more)" if len(vs) > 1 else "")
    for m in rr.mismatches:
        out("  ", ("mismatch:", "red"), f" {m}")
    if rr.error:
        out("  ", ("error:", "red"), f" {rr.error}")
    out("  counters: " + _key_counters(rr.counters))


@cli.command("run")
@click.argument("scenario")
@policy_option(("legacy", "series", "pre-5.13", "series-rc1", "series-only", "current", "both", "all"),
               help="Policy to run under (default: every policy the scenario states).")
@click.option("--trace", is_flag=True, help="Print each step's references, SPTEs and flags (journal facts).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run (a list if several).")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the run(s) as one self-contained HTML timeline, policies side by side (docs/html.md).")
@handle_errors
def run_cmd(scenario: str, policy: str | None, trace: bool, as_json: bool, html_file: str | None) -> None:
    """Run a scenario (bundled NAME or FILE) and check it against its stated outcome."""
    from kvmsim.scenarios import load_scenario
    from kvmsim.scenarios.runner import missing_requirement
    sc = load_scenario(scenario)
    why = missing_requirement(sc)
    if why:
        click.echo(f"kvmsim: {safe(sc.name)}: skipped: {why}", err=True)
        if as_json:
            click.echo(json.dumps([]))
        return
    timelines = [] if html_file else None
    results = _runs([(sc, p) for p in _policies(sc, policy)], show_progress=sys.stderr.isatty(), timelines=timelines)
    if html_file:
        _write_html(html_file, sc, timelines)
    if as_json:
        out = [run_json(r) for r in results]
        click.echo(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        con = _console()
        for r in results:
            _print_run(con, r, trace=trace)
    if not all(r.expected_match for r in results):
        sys.exit(EXIT_MISMATCH)


# ---- compare -------------------------------------------------------------------------------------------

@cli.command()
@policy_option(("legacy", "series", "pre-5.13", "series-rc1", "series-only", "current"),
               help="Also run every scenario under this policy, beside the policies it states (a run "
                    "the scenario states no outcome for always matches unless it fails).")
@click.option("--json", "as_json", is_flag=True, help="A JSON list with one object per run.")
@click.option("--html", "html_dir", type=click.Path(file_okay=False), default=None,
              help="Also write one HTML timeline per scenario (its runs side by side) and an index.html "
                   "into this directory (docs/html.md).")
@handle_errors
def compare(policy: str | None, as_json: bool, html_dir: str | None) -> None:
    """Every bundled scenario under every policy it states: verdict, violations, counters, match.

    With --policy, each scenario also runs under that policy (a plugin: your own patch) in the row
    after its own, and a summary lists the invariants it breaks where series does not."""
    from rich.table import Table

    from kvmsim.scenarios import library
    from kvmsim.scenarios.runner import missing_requirement
    pairs, skipped = [], []
    for sc in library():
        why = missing_requirement(sc)
        if why:
            skipped.append((sc.name, why))
            continue
        pairs += [(sc, p) for p in sc.policies]
        if policy is not None and policy not in sc.policies:
            pairs.append((sc, policy))
    timelines = [] if html_dir else None
    results = _runs(pairs, show_progress=sys.stderr.isatty(), timelines=timelines)
    if html_dir:
        _write_html_dir(html_dir, pairs, timelines)
    for name, why in skipped:
        click.echo(f"kvmsim: {safe(name)}: skipped: {why}", err=True)
    if as_json:
        click.echo(json.dumps([run_json(r) for r in results], indent=2))
    else:
        t = Table("scenario", "policy", "verdict", "violations", "key counters", "match", header_style="bold")
        last = None
        for r in results:
            verdict = {"clean": ("clean", "green"), "violations": ("violations", "yellow")}
            t.add_row(_text(r.scenario if r.scenario != last else ""), r.policy,
                      _text(verdict.get(r.verdict, ("error", "red"))),
                      _inv_summary(r.by_invariant()), _text(_key_counters(r.counters)),
                      _text(("✓", "green") if r.expected_match else ("✗", "red")))
            last = r.scenario
        for name, why in skipped:
            t.add_row(_text(name), "-", _text(("skipped", "dim")), _text(why), "", "-")
        con = _console()
        con.print(t)
        bad = [r for r in results if not r.expected_match]
        for r in bad:
            for m in r.mismatches:
                con.print(_text((f"{r.scenario} [{r.policy}]: {m}", "red")))
        if _is_plugin(policy):
            _print_plugin_summary(con, results, policy)
        con.print(f"{len(results) - len(bad)}/{len(results)} runs match their stated outcome", markup=False)
    if not all(r.expected_match for r in results):
        sys.exit(EXIT_MISMATCH)


def _write_html(path: str, sc, timelines: list) -> None:
    """``run --html FILE``: the page, or exit status 2 with why it could not be written."""
    from kvmsim.report import write_html
    try:
        size = write_html(path, sc, timelines)
    except OSError as e:
        click.echo(f"kvmsim: error: cannot write {safe(path)}: {safe(e.strerror or e)}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"kvmsim: wrote {safe(path)} ({size} bytes)", err=True)


def _write_html_dir(path: str, pairs, timelines: list) -> None:
    """``compare --html DIR``: one page per scenario (its runs side by side) and ``index.html``."""
    from pathlib import Path

    from kvmsim.report import write_html
    from kvmsim.report.html import render_index
    by_sc: dict[str, tuple] = {}
    for (sc, _), data in zip(pairs, timelines):
        by_sc.setdefault(sc.name, (sc, []))[1].append(data)
    entries = []
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        for name, (sc, runs) in by_sc.items():
            fname = re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".html"
            write_html(Path(path) / fname, sc, runs)
            entries.append((fname, name, runs))
        (Path(path) / "index.html").write_text(render_index(entries), encoding="utf-8")
    except OSError as e:
        click.echo(f"kvmsim: error: cannot write {safe(path)}: {safe(e.strerror or e)}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"kvmsim: wrote {len(entries)} timeline(s) and index.html to {safe(path)}", err=True)


def _print_plugin_summary(con, results, plugin: str) -> None:
    """The invariants ``plugin`` breaks in a scenario where series (else legacy, the scenario's last
    stated policy) does not."""
    by_sc: dict[str, dict[str, object]] = {}
    for r in results:
        by_sc.setdefault(r.scenario, {})[r.policy] = r
    lines = []
    for name, runs in by_sc.items():
        mine = runs.get(plugin)
        if mine is None:
            continue
        ref_name = "series" if "series" in runs else next((p for p in runs if p != plugin), None)
        if ref_name is None:
            continue
        ref = runs[ref_name].by_invariant()
        new = {k: v for k, v in mine.by_invariant().items() if k not in ref}
        if new or (mine.error and not runs[ref_name].error):
            what = _inv_summary(new) if new else f"error: {mine.error}"
            lines.append(f"  {name}: {what} (not under {ref_name})")
    con.print(_text((f"{plugin}: breaks where the reference policy does not, in {len(lines)} scenario(s)", "bold")))
    for line in lines:
        con.print(_text(line))


@cli.command("policies")
@click.option("--json", "as_json", is_flag=True, help="A JSON list: name, title, module.")
@handle_errors
def policies_cmd(as_json: bool) -> None:
    """List the shipped policies (the protocols --policy takes), each with the kernel it models."""
    from kvmsim.policies import shipped_policies
    rows = [(name, cls.title, cls.__module__) for name, cls in shipped_policies().items()]
    if as_json:
        click.echo(json.dumps([{"name": n, "title": t, "module": m} for n, t, m in rows], indent=2))
        return
    width = max(len(n) for n, _, _ in rows)
    for n, t, _ in rows:
        click.echo(f"{n:<{width}}  {t}")
    click.echo("or a plugin: path/to/file.py:ClassName or module:ClassName (docs/policies.md)")


def main() -> None:
    cli()


# ---- subcommands from other modules --------------------------------------------------------------------
for _name in ("kvmsim.cli_conform", "kvmsim.cli_bench", "kvmsim.cli_explore", "kvmsim.cli_oracle",
              "kvmsim.cli_oracle_selftests", "kvmsim.cli_patches"):
    try:
        importlib.import_module(_name)
    except ImportError:
        pass
