"""Scalar fault rate and the 64 GiB dirty-log flow of two commits, measured in one run.

    python benchmarks/compare_commits.py [OLD [NEW]] [--rounds N] [--faults-only | --flow-only | --floor]

OLD defaults to 22b2860 (main before the seam redesign, issue 12), NEW to HEAD; either may be
``WORKTREE`` for the working tree as it is (uncommitted changes included).  Each commit is checked out
into a temporary worktree (``git worktree add --detach``, removed at the end) and every measurement
runs in a fresh Python process with that worktree's ``src`` first on ``sys.path``, alternating
old, new, old, new, ... so that load from other users of the machine falls on both alike.  Times
are CPU time of the measuring process (``time.process_time()``: user + system), best of the runs.

* scalar faults: ``kvm.arch.page_fault`` on 16,384 pages the host already maps (GUP-fast succeeds),
  x86 TDP MMU, journal facts off -- ``benchmarks/test_fault_path.py``'s host-mapped case; each
  process reports its best of 7 rounds, the script the best over processes;
* 64 GiB flow: ``run_model(Options(vcpu_memory=64 GiB))`` (``kvmsim bench dirty-log -b 64G``, one
  vCPU, anonymous 4 KiB pages, two iterations), after the bench's own memory warm-up.

* ``--floor``: the 64 GiB flow's phases as multiples of their memory floor (kvmsim.bench.floor) in
  CPU time, old and new: each process measures the copy bandwidth per CPU second (numpy copy of
  1 GiB, best of 3) before its flow; a phase's multiple is its best CPU time over the best
  bandwidth, against the floor bytes of the new tree's table (the old commit needs no floor code).

Prints one line per measurement and policy: best old, best new, new / old (for the fault rate a
ratio above 1 is faster; for the flow's CPU seconds a ratio below 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
POLICIES = ("legacy", "series")

FAULTS = r"""
import json, sys, time
from kvmsim.bench.memstress import create_test_slots
from kvmsim.bench.prefault import host_prefault_range
from kvmsim.kvm.kvm import Kvm
from kvmsim.mm.host import Host

NPAGES, ROUNDS = 1 << 14, 7
out = {}
for policy in sys.argv[1:]:
    best = 0.0
    for _ in range(ROUNDS):
        host = Host(recording=False)
        kvm = Kvm(host, policy=policy, arch="x86")
        (ts,) = create_test_slots(kvm, NPAGES << 12, "anonymous", 1)
        host_prefault_range(kvm, kvm.memslots[0].by_id[ts.slot], 0, NPAGES)
        v, gpa, pf = kvm.create_vcpu(), ts.gpa, kvm.arch.page_fault
        t = time.process_time()
        for k in range(NPAGES):
            pf(v, gpa + (k << 12), True)
        best = max(best, NPAGES / (time.process_time() - t))
        assert kvm.journal.counters["page_fault"] == NPAGES
    out[policy] = best
print(json.dumps(out))
"""

FLOW = r"""
import json, sys, time
from kvmsim.bench import dirty_log_perf as d

opts = d.Options(vcpu_memory=64 << 30)
d.keep_freed_memory()
d.warm_memory((opts.total >> 12) * d.BYTES_PER_GUEST_PAGE + (64 << 20))
t = time.process_time()
d.run_model(opts, sys.argv[1])
print(json.dumps({sys.argv[1]: time.process_time() - t}))
"""


FLOOR = r"""
import json, sys, time
import numpy as np
from kvmsim.bench import dirty_log_perf as d

opts = d.Options(vcpu_memory=64 << 30)
d.keep_freed_memory()
d.warm_memory((opts.total >> 12) * d.BYTES_PER_GUEST_PAGE + (64 << 20))
src = np.ones(1 << 27, dtype=np.int64)
dst = np.empty_like(src)
np.copyto(dst, src)
best = 9e9
for _ in range(3):
    c = time.process_time()
    np.copyto(dst, src)
    best = min(best, time.process_time() - c)
del src, dst
cpu = {}


def progress(name, it, seconds):        # each phase's CPU time (an old commit's Phase has none)
    if seconds is None:
        cpu[(name, it)] = time.process_time()
    else:
        cpu[(name, it)] = time.process_time() - cpu[(name, it)]


r = d.run_model(opts, sys.argv[1], progress)
print(json.dumps({"bw": 2 * (1 << 30) / best, "phases": [[p.name, p.iteration, cpu[(p.name, p.iteration)],
                  d.summarize(p.counters)["set_dirty"]] for p in r.phases]}))
"""


def _floor(old_src: pathlib.Path, new_src: pathlib.Path, rounds: int) -> None:
    """Per-phase CPU-time floor multiples of the 64 GiB flow, old and new (``--floor``)."""
    sys.path.insert(0, str(new_src))
    from kvmsim.bench.floor import phase_floor_bytes
    state = {"mem_map.cls": 1, "mem_map.flags": 2, "mem_map.refcount": 4, "mem_map.pincount": 4,
             "mem_map.head": 8, "mem_map.order": 1, "mem_map.data": 8, "mem_map.owner": 4, "mem_map.index": 8,
             "pte.pfn": 8, "pte.flags": 1, "pte.level": 1, "spte.pfn": 8, "spte.bits": 2, "spte.level": 1,
             "dirty_bitmap": 1}                       # the per-page dtypes both trees keep (62 B)
    npages = (64 << 30) >> 12
    for p in POLICIES:
        best: dict = {"old": {}, "new": {}}
        bw = {"old": 0.0, "new": 0.0}
        for _ in range(rounds):
            for tag, src in (("old", old_src), ("new", new_src)):
                out = _run(src, FLOOR, p)
                bw[tag] = max(bw[tag], out["bw"])
                for name, it, cpu, set_dirty in out["phases"]:
                    k = (name, it, set_dirty)
                    best[tag][k] = min(best[tag].get(k, 9e9), cpu)
        print(f"64 GiB flow, {p}: CPU x floor (copy {bw['old'] / 1e9:.1f} / {bw['new'] / 1e9:.1f} GB/s per CPU s)")
        tot = {"old": [0.0, 0.0], "new": [0.0, 0.0]}
        for (name, it, sd) in best["new"]:
            nbytes = phase_floor_bytes(state, name, it, npages, sd)
            row = []
            for tag in ("old", "new"):
                cpu = best[tag].get((name, it, sd))
                if cpu is None:
                    row.append("   -  ")
                    continue
                floor = nbytes / bw[tag]
                tot[tag][0] += cpu
                tot[tag][1] += floor
                row.append(f"{cpu:7.4f} s {cpu / floor:8.1f}x")
            print(f"  {name + str(it or ''):<14} old {row[0]}  new {row[1]}", flush=True)
        print(f"  {'flow':<14} old {tot['old'][0]:7.4f} s {tot['old'][0] / tot['old'][1]:8.1f}x  "
              f"new {tot['new'][0]:7.4f} s {tot['new'][0] / tot['new'][1]:8.1f}x", flush=True)


def _run(src: pathlib.Path, code: str, *args: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(src), KVMSIM_ORACLE="0")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, check=True, capture_output=True,
                         text=True, cwd=src.parent).stdout
    return json.loads(out.strip().splitlines()[-1])


def _checkout(rev: str, tmp: pathlib.Path) -> tuple[pathlib.Path, str]:
    """(the src directory of ``rev``, its short hash), in a detached worktree under ``tmp``."""
    if rev == "WORKTREE":
        return REPO / "src", "worktree"
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    path = tmp / sha
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), sha], check=True,
                   capture_output=True)
    return path / "src", sha


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", nargs="?", default="22b2860")
    ap.add_argument("new", nargs="?", default="HEAD")
    ap.add_argument("--rounds", type=int, default=5, help="processes per commit and measurement (default 5)")
    ap.add_argument("--flow-rounds", type=int, default=3, help="64 GiB flows per commit and policy (default 3)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--faults-only", action="store_true")
    which.add_argument("--flow-only", action="store_true")
    which.add_argument("--floor", action="store_true", help="per-phase CPU-time floor multiples, 64 GiB flow")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvmsim-compare-") as tmpdir:
        tmp = pathlib.Path(tmpdir)
        trees = []
        try:
            for rev in (a.old, a.new):
                trees.append(_checkout(rev, tmp))
            (old_src, old_name), (new_src, new_name) = trees
            print(f"old {a.old} ({old_name}), new {a.new} ({new_name}); CPU time, best of the runs, "
                  "old and new alternating", flush=True)
            if a.floor:
                _floor(old_src, new_src, a.flow_rounds)
                return 0
            if not a.flow_only:
                best = {t: dict.fromkeys(POLICIES, 0.0) for t in ("old", "new")}
                for _ in range(a.rounds):
                    for tag, src in (("old", old_src), ("new", new_src)):
                        for p, rate in _run(src, FAULTS, *POLICIES).items():
                            best[tag][p] = max(best[tag][p], rate)
                for p in POLICIES:
                    o, n = best["old"][p], best["new"][p]
                    print(f"scalar faults/s {p:7s} old {o:9,.0f}  new {n:9,.0f}  new/old {n / o:.3f}", flush=True)
            if not a.faults_only:
                for p in POLICIES:
                    best = {"old": float("inf"), "new": float("inf")}
                    for _ in range(a.flow_rounds):
                        for tag, src in (("old", old_src), ("new", new_src)):
                            best[tag] = min(best[tag], _run(src, FLOW, p)[p])
                    o, n = best["old"], best["new"]
                    print(f"64 GiB flow CPU s   {p:7s} old {o:9.3f}  new {n:9.3f}  new/old {n / o:.3f}", flush=True)
        finally:
            for src, name in trees:
                if name != "worktree":
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(src.parent)],
                                   capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
