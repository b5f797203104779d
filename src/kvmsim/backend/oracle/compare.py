"""Holding the model against a real kernel: run every case on the model side (model_side.py) and
compare it, phase by phase and key by key, with the real side's recorded results (agent.py).

Rules: a case agrees when both ran it, its phases have the same names, and every compared key is
equal in every phase.  A kernel function the real kernel lacks ("absent") agrees only with 0 model
calls.  A case the real side skipped (no 1 GiB page, ...) is reported as skipped, never as agreeing; a
case that raised, or during which the kernel logged a WARN/BUG, disagrees.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

from kvmsim.backend.oracle.cases import CASES, Case
from kvmsim.backend.oracle.model_side import ModelSide
from kvmsim.backend.oracle.side import CaseSkipped

ABSENT = "absent"


@dataclass
class Row:
    case: str
    group: str
    agree: bool | None                  # None: skipped
    model: dict = field(default_factory=dict)
    real: dict = field(default_factory=dict)
    diffs: list[tuple[str, str, object, object]] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        return {"case": self.case, "group": self.group, "model": self.model, "real": self.real,
                "agree": self.agree, "diffs": [list(d) for d in self.diffs], "note": self.note}


def run_model_case(case: Case, policy: str, release: str | None = None) -> dict:
    """One case on a fresh model side: the same record shape the agent writes."""
    side = ModelSide(policy, release)
    rec = {"phases": [], "error": None, "skipped": None, "warnings": []}
    t0 = time.perf_counter()
    try:
        case.fn(side)
    except CaseSkipped as e:
        rec["skipped"] = str(e)
    except Exception as e:              # noqa: BLE001 - a model failure is a disagreement, reported
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()
    finally:
        try:
            side.end()
        except Exception:               # noqa: BLE001
            pass
    rec["phases"] = [{"name": p.name, "out": p.out, "counts": p.counts, "info": p.info}
                      for p in side.phases]
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def _value(rec_phase: dict, key: str, real: bool):
    if key == "out":
        return rec_phase["out"]
    v = rec_phase["counts"].get(key, None)
    if v is None:
        return ABSENT if real else 0
    return v


def compare_case(case: Case, model: dict, real: dict | None) -> Row:
    row = Row(case.name, case.group, None)
    if real is None:
        row.note = "not run on this kernel"
        return row
    if real.get("skipped"):
        row.note = f"skipped on the kernel: {real['skipped']}"
        return row
    problems = []
    if real.get("error"):
        problems.append(f"kernel side raised {real['error']}")
    if model.get("error"):
        problems.append(f"model side raised {model['error']}")
    if model.get("skipped"):
        problems.append(f"model side skipped: {model['skipped']}")
    if real.get("warnings"):
        problems.append("kernel WARN: " + " | ".join(real["warnings"][:3]))
    mph, rph = model.get("phases", []), real.get("phases", [])
    if [p["name"] for p in mph] != [p["name"] for p in rph]:
        problems.append(f"phases differ: model {[p['name'] for p in mph]} real {[p['name'] for p in rph]}")
    for mp, rp in zip(mph, rph):
        mv, rv = {}, {}
        for key in case.compare:
            m, r = _value(mp, key, False), _value(rp, key, True)
            if key != "out" and m == 0 and r in (0, ABSENT):
                continue
            mv[key], rv[key] = m, r
            if m == r or (r == ABSENT and m == 0):
                continue
            row.diffs.append((mp["name"], key, m, r))
        row.model[mp["name"]] = mv
        row.real[rp["name"]] = rv
    row.agree = not problems and not row.diffs
    row.note = "; ".join(problems)
    return row


def compare_kernel(real_results: dict, policy: str | None = None, cases: list[Case] | None = None) -> list[Row]:
    """Every case: the model under the kernel's protocol against the kernel's recorded results."""
    policy = policy or real_results["policy"]
    rows = []
    for case in cases or CASES:
        real = real_results["cases"].get(case.name)
        model = run_model_case(case, policy, real_results.get("release")) if real is not None and not real.get("skipped") else {}
        rows.append(compare_case(case, model, real))
    return rows
