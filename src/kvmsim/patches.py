"""The 85 patches of "KVM: Stop grabbing references to PFNMAP'd pages" (v13, merged for v6.13 as
5cb1659f4120), one row each, and the bundled scenarios that demonstrate them.

A row is the patch's number and exact title (``docs/series-patches.md``), its kind judged in isolation
(:class:`Kind`: refactor, behaviour change, API change with an observable effect), the arch or area it
touches and the one-line difference legacy (v6.12) → series (v6.13).  The rows are data, in
``patches.toml`` beside this module; the table follows ``reference/series-patch-map.md``.

The claim "scenario S demonstrates patch N" lives next to the demonstration: a bundled scenario file
declares ``patches = [N, ...]`` in its header, and :func:`demonstrations` collects them.
:func:`outcome_differences` runs a scenario under legacy and series and says what differs (verdict,
violations, a step's result or errno, a counter), so a claim without a difference is caught
(``tests/test_patches.py``).  ``kvmsim patches`` prints the table (``--json``, ``--markdown`` for
``docs/patches.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(Enum):
    """A patch's kind, judged on the tree just before it (series-patch-map.md's R / B / A)."""

    REFACTOR = "R"
    BEHAVIOUR = "B"
    API = "A"

    @property
    def label(self) -> str:
        return {"R": "refactor", "B": "behaviour change", "A": "API change"}[self.value]


@dataclass(frozen=True)
class Patch:
    """One patch of the series."""

    number: int
    title: str
    kind: Kind
    kind_note: str          # e.g. "latent fix, Cc stable", "in isolation"
    arch: str
    difference: str         # legacy → series, one line


def _load() -> tuple[Patch, ...]:
    """The rows of ``patches.toml`` (package data beside this module), checked to be patches 1..85 in
    order with a known kind."""
    import tomllib
    from importlib.resources import files
    rows = tomllib.loads(files("kvmsim").joinpath("patches.toml").read_text(encoding="utf-8"))["patch"]
    out = tuple(Patch(r["number"], r["title"], Kind(r["kind"]), r["note"], r["arch"], r["difference"])
                for r in rows)
    if [p.number for p in out] != list(range(1, 86)):
        raise RuntimeError("kvmsim/patches.toml must list patches 1..85 in order")
    return out


#: Every patch, in series order (PATCHES[n - 1].number == n), from ``patches.toml``.
PATCHES: tuple[Patch, ...] = _load()


def patch(number: int) -> Patch:
    """The row of patch ``number`` (1..85)."""
    if not 1 <= number <= len(PATCHES):
        raise KeyError(f"no patch {number}: the series has patches 1..{len(PATCHES)}")
    return PATCHES[number - 1]


# ---- demonstrations --------------------------------------------------------------------------------

def demonstrations(scenarios=None) -> dict[int, list[str]]:
    """Patch number → the bundled scenarios that declare ``patches = [..., N, ...]``, sorted by name."""
    from kvmsim.scenarios import library
    out: dict[int, list[str]] = {p.number: [] for p in PATCHES}
    for sc in (library() if scenarios is None else scenarios):
        for n in sc.patches:
            out[n].append(sc.name)
    return {n: sorted(v) for n, v in out.items()}


def outcome(rr) -> dict:
    """What a run shows, for comparing two policies: verdict, violations per invariant, each step's
    result and errno, and every counter (journal counters plus what KVM did to struct pages)."""
    return {"verdict": rr.verdict, "violations": rr.by_invariant(),
            "steps": [(s.res.result, s.res.errno_name) for s in rr.steps],
            "counters": {k: v for k, v in rr.counters.items() if v}}


def outcome_differences(sc, a: str = "legacy", b: str = "series") -> list[str]:
    """Run ``sc`` under policies ``a`` and ``b``; what differs (empty: the two outcomes are the same)."""
    from kvmsim.scenarios.runner import run
    oa, ob = outcome(run(sc, a)), outcome(run(sc, b))
    out = []
    if oa["verdict"] != ob["verdict"]:
        out.append(f"verdict {oa['verdict']} / {ob['verdict']}")
    if oa["violations"] != ob["violations"]:
        out.append(f"violations {oa['violations'] or '{}'} / {ob['violations'] or '{}'}")
    for i, (sa, sb) in enumerate(zip(oa["steps"], ob["steps"]), 1):
        if sa != sb:
            out.append(f"step {i} {'/'.join(map(str, sa))} vs {'/'.join(map(str, sb))}")
    if len(oa["steps"]) != len(ob["steps"]):
        out.append(f"steps run {len(oa['steps'])} / {len(ob['steps'])}")
    names = sorted(set(oa["counters"]) | set(ob["counters"]))
    diff = [f"{k} {oa['counters'].get(k, 0)}/{ob['counters'].get(k, 0)}" for k in names
            if oa["counters"].get(k, 0) != ob["counters"].get(k, 0)]
    if diff:
        out.append("counters " + ", ".join(diff))
    return out


def table(*, check: bool = False) -> list[dict]:
    """The rows as dicts (``kvmsim patches --json``); with ``check`` each demonstrating scenario is run
    under legacy and series and carries what differs."""
    from kvmsim.scenarios import library
    scs = {sc.name: sc for sc in library()}
    demos = demonstrations(scs.values())
    rows = []
    for p in PATCHES:
        row = {"number": p.number, "title": p.title, "kind": p.kind.label, "kind_note": p.kind_note,
               "arch": p.arch, "difference": p.difference, "scenarios": demos[p.number]}
        if check:
            row["differences"] = {n: outcome_differences(scs[n]) for n in demos[p.number]}
        rows.append(row)
    return rows


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict] | None = None) -> str:
    """``docs/patches.md`` (``kvmsim patches --markdown``)."""
    rows = table() if rows is None else rows
    kinds = {k.label: [r["number"] for r in rows if r["kind"] == k.label] for k in Kind}
    shown = [r for r in rows if r["kind"] != Kind.REFACTOR.label]
    missing = [r["number"] for r in shown if r["kind"] == Kind.BEHAVIOUR.label and not r["scenarios"]]
    out = ["# The 85 patches and their demonstrations",
           "",
           "Generated by `kvmsim patches --markdown > docs/patches.md` from `src/kvmsim/patches.toml` and the",
           "`patches = [...]` keys of the bundled scenarios; `tests/test_patches.py` checks it is current, and that",
           "every demonstrating scenario's legacy and series outcomes differ (`kvmsim patches --check`).",
           "",
           "| kind | count |",
           "|---|---|"]
    out += [f"| {label} | {len(ns)} |" for label, ns in kinds.items()]
    out += ["", f"Behaviour changes without a bundled demonstration: "
                f"{', '.join(map(str, missing)) if missing else 'none'}.", "",
            "| # | title | kind | arch / area | legacy → series | scenarios |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        kind = r["kind"] + (f" ({r['kind_note']})" if r["kind_note"] else "")
        scen = ", ".join(f"`{n}`" for n in r["scenarios"]) or ("—" if r["kind"] != Kind.REFACTOR.label else "")
        out.append(f"| {r['number']} | {_cell(r['title'])} | {_cell(kind)} | {_cell(r['arch'])} | "
                   f"{_cell(r['difference'])} | {scen} |")
    return "\n".join(out) + "\n"
