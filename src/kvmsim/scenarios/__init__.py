"""Scenarios: host + VM set-up, ordered steps and stated legacy/series outcomes (issue 4).

* :mod:`.spec` — the in-memory :class:`Scenario` and its builder;
* :mod:`.loader` — TOML files → Scenario, with file:line errors;
* :mod:`.ops` — the step operations (kernel paths on the model);
* :mod:`.runner` — run under a policy, check every step, compare with the stated outcome;
* ``library/*.toml`` — the bundled scenarios (``kvmsim list``).
"""

from __future__ import annotations

import os
from importlib import resources
from kvmsim.errors import ScenarioError
from kvmsim.scenarios.spec import Scenario


def library_names() -> list[str]:
    """Names of the bundled scenarios, sorted."""
    lib = resources.files("kvmsim.scenarios") / "library"
    return sorted(p.name[:-5] for p in lib.iterdir() if p.name.endswith(".toml"))


def library_path(name: str):
    return resources.files("kvmsim.scenarios") / "library" / f"{name}.toml"


def load_scenario(name_or_file: str) -> Scenario:
    """A bundled scenario by name, or a scenario file by path."""
    from kvmsim.scenarios.loader import load, loads
    if name_or_file in library_names():
        p = library_path(name_or_file)
        return loads(p.read_text(encoding="utf-8"), file=f"library/{name_or_file}.toml")
    try:
        is_path = os.path.lexists(name_or_file)
    except ValueError:                                  # an embedded NUL: no such file
        is_path = False
    if is_path or name_or_file.endswith(".toml") or os.sep in name_or_file:
        return load(name_or_file)
    raise ScenarioError(f"no bundled scenario or file named {name_or_file!r}; "
                        f"bundled: {', '.join(library_names())}")


def library() -> list[Scenario]:
    return [load_scenario(n) for n in library_names()]


__all__ = ["Scenario", "library", "library_names", "load_scenario"]
