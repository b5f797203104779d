"""Dynamic partial-order reduction over the preemption-bounded DFS (Flanagan and Godefroid, POPL 2005).

Stateless, like the plain DFS: every schedule re-executes from a fresh setup.  Where the plain DFS
tries every other runnable thread at every step, DPOR tries another thread at a step only when
a run shows a *race* with it: a step of thread ``p`` that conflicts
(:class:`~kvmsim.explore.por.Footprint`) with an earlier step ``j`` of another thread that does
not happen before ``p``'s previous step (happens-before: program order plus conflicts, as
bitsets).  Node ``j`` then gets ``p`` in its backtrack set (every runnable thread there when
``p`` was not runnable: a thread blocked on a lock).

Three conservative choices keep it finding what the plain DFS finds (the agreement test,
``tests/explore/test_por.py``, checks it on every race x policy x mutation):

* every racing ``j`` is a backtrack point, not only the last one, and co-enabledness is not
  modelled (a release and an acquisition of a lock race like any conflicting pair);
* a run cut short by a violation never took its remaining steps, which could race with any step
  it took: its nodes get every runnable thread, as in the plain DFS;
* the preemption bound: a backtrack point that would exceed it is dropped, which alone can miss
  schedules (the reversed race may be reachable within the bound only by switching earlier), so,
  as in Coons, Musuvathi and McKinley's bounded POR (OOPSLA 2013), the thread is also added at the
  latest free choice point before the race (a step where the previous thread could not run).

No sleep sets: combined with the preemption bound they pruned schedules whose only equivalent
needed more preemptions than the bound allows (``fault-vs-writeback`` with ``skip-retry``: INV-5
lost), the known pitfall of bounded POR.

A subtree (:class:`~kvmsim.explore.engine.FrontierItem`) is searched on its own: races that
reach above its root are dropped, because :func:`~kvmsim.explore.engine.frontier` expands every
node above the items fully (every alternative within the bound).
"""

from __future__ import annotations

from typing import Iterator

from kvmsim.explore.por import Footprint, independent


class _Node:
    """The state before one step of the current path: who may still be tried there."""

    __slots__ = ("runnable", "first", "done", "backtrack", "sleep", "fps")

    def __init__(self, runnable: tuple[str, ...], taken: str, sleep: dict[str, Footprint], fp: Footprint):
        self.runnable = runnable
        self.first = taken                      # the thread the first run took here (no preemption)
        self.done = {taken}                     # threads whose subtree here is searched (or under way)
        self.backtrack = {taken}                # threads the races so far ask for here
        self.sleep = sleep                      # asleep on entry: thread -> the footprint of its step
        self.fps = {taken: fp}                  # the footprint of each thread's step tried here


def _entry_sleep(nd: _Node, prev: str | None, taken: str, fp: Footprint) -> dict[str, Footprint]:
    """Who sleeps after ``taken``'s step at node ``nd`` (``prev``: the thread that ran before it).

    Only a *preemption* puts a thread to sleep, and only the thread it preempted (the node's first,
    non-preemptive choice): a schedule that later runs that thread's (commuting) step is equivalent
    to one that ran it here first, and that one needs no more preemptions (the switch it saves pays
    for the one it adds).  A sibling explored after a free switch, or another preempting sibling,
    would need one more, which the bound may not allow: they stay awake."""
    z = {u: f for u, f in nd.sleep.items() if u != taken and independent(f, fp)}
    if prev is not None and prev != taken and prev in nd.runnable and nd.first == prev \
            and independent(nd.fps[prev], fp):
        z[prev] = nd.fps[prev]
    return z


def _happens_before(run) -> tuple[list[int], list[int]]:
    """``reach[j]``: bitmask of the steps ``j`` happens before; ``preds[k]``: the steps before ``k``."""
    steps, fps = run.steps, run.footprints
    n = len(steps)
    reach = [0] * n
    for j in range(n - 1, -1, -1):
        r = 0
        tj, fj = steps[j].thread, fps[j]
        for m in range(j + 1, n):
            if r >> m & 1:
                continue
            if steps[m].thread == tj or not independent(fj, fps[m]):
                r |= (1 << m) | reach[m]
        reach[j] = r
    preds = [0] * n
    for j in range(n):
        r = reach[j]
        while r:
            low = r & -r
            preds[low.bit_length() - 1] |= 1 << j
            r ^= low
    return reach, preds


def _would_block(run, j: int, k: int) -> bool:
    """Thread ``p`` (of step ``k``) takes a lock at ``k`` that another thread holds before step ``j``:
    ``p``'s step could not run there (it would only block), so the two are not co-enabled."""
    p = run.steps[k].thread
    writes = run.footprints[k].writes
    hk, hj = run.holders[k], run.holders[j]
    for lock, (wk, rk) in hk.items():
        wj, rj = hj[lock]
        if wk == p or p in rk:
            continue                                # p holds it already: a release, not an acquisition
        if (lock, "writer") in writes and (wj not in (None, p) or any(r != p for r in rj)):
            return True
        if (lock, "readers") in writes and wj not in (None, p):
            return True
    return False


def _races(run) -> Iterator[tuple[int, int]]:
    """Pairs ``(j, k)``: step ``k`` of thread ``p`` conflicts with step ``j`` of another thread, and
    ``j`` does not happen before ``p``'s previous step.

    That is Flanagan and Godefroid's condition with ``p``'s *pending* step standing in for its
    next step at every state between its previous step and ``k`` (a thread blocked on a lock
    another one takes and releases meanwhile still races with that acquisition), and with every
    such ``j``, not only the last one.  Co-enabledness comes from the locks only: a ``j`` before which
    another thread holds the lock ``k`` takes is skipped (:func:`_would_block`)."""
    steps, fps = run.steps, run.footprints
    reach, _ = _happens_before(run)
    last: dict[str, int] = {}
    for k in range(len(steps)):
        tk, fk = steps[k].thread, fps[k]
        prev = last.get(tk, -1)
        for j in range(k - 1, -1, -1):
            if steps[j].thread == tk or independent(fps[j], fk):
                continue
            if prev >= 0 and (j == prev or reach[j] >> prev & 1):
                continue
            if _would_block(run, j, k):
                continue
            yield j, k
        last[tk] = k


def dpor_subtree(scenario, policy, mutations, item, bound: int, limit: int, result=None):
    """The runs DPOR needs in the subtree ``item`` roots (see the module docstring)."""
    from kvmsim.explore.engine import Coverage, Step, count_preemptions, execute

    base = len(item.prefix)
    path: list[_Node] = []                      # path[i] is the node before step base + i
    prefix = list(item.prefix)
    n = 0
    while True:
        if n >= limit:
            if result is not None:
                result.coverage = Coverage.TRUNCATED
                result.pending = sum(len(nd.backtrack - nd.done) for nd in path)
            return
        run = execute(scenario, policy, mutations, prefix, footprints=True, checked=max(0, len(prefix) - 1))
        n += 1
        yield run
        steps, fps = run.steps, run.footprints
        del path[len(prefix) - base:]           # keep the nodes of the prefix this run shares
        z: dict[str, Footprint] = {}
        if len(prefix) > base:                  # the branch node: who sleeps below the alternative
            b = len(prefix) - 1
            nd = path[b - base]
            nd.fps[steps[b].thread] = fps[b]
            z = _entry_sleep(nd, steps[b - 1].thread if b else None, steps[b].thread, fps[b])
        for k in range(base + len(path), len(steps)):
            path.append(_Node(steps[k].runnable, steps[k].thread, z, fps[k]))
            if steps[k].thread in z:            # a sleeper runs after all: nothing sleeps below
                z = {}
            elif z:
                z = {u: f for u, f in z.items() if independent(f, fps[k])}
        # backtrack points from the races of this run (only inside the subtree).  A run cut short
        # by a violation has steps it never took, which may race with any step it took: every
        # runnable thread is tried at each of its nodes, as the plain DFS does.
        if run.violation is not None:
            for nd in path:
                nd.backtrack.update(nd.runnable)
        for j, k in _races(run):
            if j < base:
                continue
            nd = path[j - base]
            p = steps[k].thread
            for c in ([p] if p in nd.runnable else list(nd.runnable)):
                if c in nd.backtrack:
                    continue
                if count_preemptions(steps[:j] + [Step(c, "", nd.runnable)]) <= bound:
                    nd.backtrack.add(c)
                    continue
                for i in range(j - 1, base - 1, -1):   # the latest free choice point before the race
                    if (i == 0 or steps[i - 1].thread not in steps[i].runnable) and c in steps[i].runnable:
                        path[i - base].backtrack.add(c)
                        break
        # the deepest node with a thread left to try
        prefix = None
        for i in range(len(path) - 1, -1, -1):
            nd = path[i]
            for c in sorted(nd.backtrack - nd.done):
                nd.done.add(c)
                if c not in nd.sleep and count_preemptions(steps[:base + i] + [Step(c, "", nd.runnable)]) <= bound:
                    prefix = [s.thread for s in steps[:base + i]] + [c]
                    break
            if prefix is not None:
                del path[i + 1:]
                break
        if prefix is None:
            return
