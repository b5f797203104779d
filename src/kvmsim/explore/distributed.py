"""The exhaustive search spread over a Dask cluster: one task per subtree of the schedule tree.

No kernel file: this is the explorer's own machinery (``kvmsim explore NAME --workers N`` or
``--address tcp://host:port``; docs/explorer-distributed.md).  Dask (``pip install
'kvmsim[distributed]'``) is imported only here and only when asked for.

How the search is split:

1. :func:`frontier` runs the top of the tree here, breadth first, until there are about
   ``per_worker`` × workers unexpanded prefixes (or the tree ran out).  Each is a :class:`Subtree`:
   the prefix and its *key*, the position of that prefix in the single-process DFS's order.
2. A task (:func:`search_subtree`: the same preemption-bounded DFS, rooted at each prefix in turn)
   takes its share of the queue, the subtrees that come first in DFS order, and runs for at most
   :data:`CHUNK_SECONDS`; the prefixes it has not reached by then come back as subtrees and are
   queued again, so a big subtree spreads over idle workers and many small ones share a task.  A
   task carries only plain data (:class:`SearchSpec`: race, arch, policy name or plugin spec, mutation
   names, bound; the subtrees; its schedule cap): the worker rebuilds the world itself, as every
   schedule does anyway.
3. Results stream back as tasks finish.  A violation found at key *K* cancels every task whose
   subtrees come after *K* in DFS order; the subtrees before *K* still run, because one of them may
   hold an earlier violation.  So the violation reported is the one the single-process DFS stops at,
   on any number of workers, and it is shrunk here exactly as :func:`~kvmsim.explore.engine.explore`
   shrinks it.

Counts and coverage mean what they mean in :class:`~kvmsim.explore.engine.Result`: *complete* (every
subtree ran out: ``explored`` equals the single-process count), *stopped* (a violation; ``explored``
counts the schedules whose results came back), *truncated* (the tasks together ran ``max_schedules``
schedules, never more, and ``pending`` prefixes were still queued).

The engine-specific part is :func:`children` (how a node's run expands, here the plain DFS's rule):
a reduced search (i17-por's sleep sets: an item carries its sleep set) plugs its expansion in there and
keys what it returns; the ordering, the queue, the cap and the stopping rule stay as they are.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from kvmsim.errors import ExploreError, UsageError
from kvmsim.explore.engine import MAX_SCHEDULES, Coverage, Result, Step, count_preemptions, execute, shrink

#: Prefixes the frontier aims for per worker: enough to even out subtrees of unequal size.
PER_WORKER = 8

#: Seconds one task runs at most before it hands back what is left of its subtrees: long enough that
#: Dask's cost per task (~1-3 ms here) is under 1%, short enough to even out the load.
CHUNK_SECONDS = 0.5

#: What to install when Dask is missing.
INSTALL_HINT = "pip install 'kvmsim[distributed]' (dask and distributed)"


class DistributedUnavailable(UsageError):
    """``--workers``/``--address`` without Dask installed, or a scheduler that cannot be reached."""


# ---- the task interface -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchSpec:
    """Everything a worker needs to rebuild the race: names only, nothing that holds model state."""

    scenario: str
    arch: str
    policy: str                      # a shipped policy's name, or a plugin spec (file.py:Class)
    mutations: tuple[str, ...]
    bound: int

    def rebuild(self):
        """(scenario, policy, mutations) as :func:`~kvmsim.explore.engine.execute` takes them."""
        from kvmsim.explore.mutations import Mutations
        from kvmsim.explore.scenarios import SCENARIOS
        from kvmsim.policies.plugin import is_plugin_spec, load_plugin
        if self.scenario not in SCENARIOS:
            raise UsageError(f"race {self.scenario!r} is not known to this kvmsim (workers need the same version)")
        policy = load_plugin(self.policy) if is_plugin_spec(self.policy) else self.policy
        return SCENARIOS[self.scenario].on(self.arch), policy, Mutations.parse(self.mutations)


@dataclass(frozen=True, order=True)
class Subtree:
    """One prefix of the schedule tree; ``key`` orders it as the single-process DFS visits it."""

    key: tuple[int, ...]
    prefix: tuple[str, ...]


@dataclass(frozen=True)
class Found:
    """The first violation in one subtree: its full schedule and invariant id."""

    key: tuple[int, ...]
    schedule: tuple[str, ...]
    invariant: str


@dataclass
class Frontier:
    """The top of the tree, run on the client: the subtrees below it, in DFS order, and what it ran."""

    subtrees: list[Subtree]
    explored: int = 0
    found: list[Found] = field(default_factory=list)
    truncated: bool = False          # the cap ran out before the frontier was built


@dataclass
class SubtreeResult:
    """What a task sends back: plain data, like its arguments."""

    key: tuple[int, ...]
    explored: int
    found: Found | None
    left: list[Subtree]              # the prefixes still queued when the task's cap ran out
    seconds: float                   # wall time of the search
    cpu_seconds: float = 0.0         # CPU time of the thread that ran it


def children(node: Subtree, run, bound: int) -> list[Subtree]:
    """The prefixes :func:`~kvmsim.explore.engine.dfs` queues after running ``node``, with their keys:
    the same rule (an alternative thread at each step past the prefix, within the preemption bound),
    keyed in the order the DFS pops them (it pops the last pushed first)."""
    steps = run.steps
    out = []
    for j in range(len(steps) - 1, len(node.prefix) - 1, -1):
        for alt in steps[j].runnable:
            if alt == steps[j].thread:
                continue
            cand = steps[:j] + [Step(alt, "", steps[j].runnable)]
            if count_preemptions(cand) <= bound:
                out.append(tuple(s.thread for s in cand))
    return [Subtree(node.key + (len(out) - 1 - i,), prefix) for i, prefix in enumerate(out)]


def frontier(scenario, policy, mutations, bound: int, want: int, limit: int = MAX_SCHEDULES) -> Frontier:
    """Run the top of the tree breadth first until ``want`` prefixes are queued; those are the subtrees.

    A prefix that violates is a :class:`Found` and is not expanded (the DFS stops there)."""
    queue: deque[Subtree] = deque([Subtree((), ())])
    out = Frontier([])
    while queue and len(queue) < want:
        if out.explored >= limit:
            out.truncated = True
            break
        node = queue.popleft()
        run = execute(scenario, policy, mutations, list(node.prefix))
        out.explored += 1
        if run.violation is not None:
            out.found.append(Found(node.key, tuple(run.schedule), run.violation.invariant))
            continue
        queue.extend(children(node, run, bound))
    out.subtrees = sorted(queue)
    return out


def search_subtree(scenario, policy, mutations, bound: int, subtrees: list[Subtree], limit: int,
                   seconds: float | None = None) -> SubtreeResult:
    """The DFS under each of ``subtrees`` in turn, in the single-process order, until the first violation,
    ``limit`` schedules or ``seconds``; what it did not reach comes back as subtrees (``left``).

    The stack stays sorted, smallest key on top: a node's children come before every later subtree."""
    t0, c0 = time.perf_counter(), time.thread_time()
    stack = sorted(subtrees, reverse=True)
    n, found = 0, None
    while stack and n < limit and (seconds is None or n == 0 or time.perf_counter() - t0 < seconds):
        node = stack.pop()
        run = execute(scenario, policy, mutations, list(node.prefix))
        n += 1
        if run.violation is not None:
            found = Found(node.key, tuple(run.schedule), run.violation.invariant)
            stack = []                   # everything left comes after it
            break
        stack.extend(children(node, run, bound))
    return SubtreeResult(min(s.key for s in subtrees), n, found, stack[::-1], time.perf_counter() - t0,
                         time.thread_time() - c0)


def run_task(spec: SearchSpec, subtrees: list[Subtree], limit: int, seconds: float) -> SubtreeResult:
    """What a worker runs: rebuild the race from names, search the subtrees."""
    scenario, policy, mutations = spec.rebuild()
    return search_subtree(scenario, policy, mutations, spec.bound, subtrees, limit, seconds)


# ---- the cluster ----------------------------------------------------------------------------------------

def _dask():
    try:
        import distributed
    except ImportError:
        raise DistributedUnavailable(f"--workers/--address need Dask, which is not installed: {INSTALL_HINT}") from None
    return distributed


@contextlib.contextmanager
def connect(*, workers: int | None = None, address: str | None = None, timeout: str = "10s") -> Iterator:
    """A Dask client: a :class:`distributed.LocalCluster` of ``workers`` processes (one thread each) started
    here, or the scheduler at ``address``."""
    if (workers is None) == (address is None):
        raise UsageError("give either a number of workers or a scheduler address")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    distributed = _dask()
    if address is not None:
        try:
            client = distributed.Client(address, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as e:
            raise DistributedUnavailable(f"cannot reach the Dask scheduler at {address!r}: {e}") from None
        with client:
            yield client
        return
    # dashboard_address ":0": the scheduler's HTTP server (always started) on a free port, not 8787
    with distributed.LocalCluster(n_workers=workers, processes=True, threads_per_worker=1,
                                  dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def policy_spec(policy: str) -> str:
    """What a worker loads ``policy`` from: the name of a shipped policy, or the plugin's spec (a file
    path made absolute, so a worker started elsewhere finds it)."""
    from kvmsim.policies.plugin import loaded_spec
    spec = loaded_spec(policy)
    if spec is None:
        return policy
    target, sep, cls = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if target.endswith(".py") or os.path.exists(target):
        return os.path.abspath(target) + sep + cls
    return spec


# ---- the search -----------------------------------------------------------------------------------------

def explore_distributed(scenario, policy: str, mutations, client, *, bound: int = 2,
                        max_schedules: int = MAX_SCHEDULES, per_worker: int = PER_WORKER,
                        chunk_seconds: float = CHUNK_SECONDS,
                        progress: Callable[[int], None] | None = None,
                        stats: dict | None = None) -> Result:
    """The preemption-bounded DFS of :func:`~kvmsim.explore.engine.explore` as tasks on ``client``'s
    workers; same verdict, same violation, same count when complete.  A task takes its share of the
    queue and runs at most ``chunk_seconds``; what it leaves goes back into the queue.  ``stats`` (when
    given) receives the frontier's size and time, the task count and each task's wall and CPU seconds."""
    if max_schedules < 1:
        raise UsageError(f"max_schedules must be >= 1, got {max_schedules}")
    distributed = _dask()
    spec = SearchSpec(scenario.name, scenario.arch, policy_spec(policy), tuple(mutations.names()), bound)
    res = Result(max_schedules=max_schedules)
    t0 = time.perf_counter()
    nworkers = max(1, len(client.scheduler_info().get("workers", {})))
    front = frontier(scenario, policy, mutations, bound, per_worker * nworkers, max_schedules)
    res.explored = front.explored
    best = min(front.found, key=lambda f: f.key, default=None)
    todo = [s for s in front.subtrees if best is None or s.key < best.key]     # a heap: DFS order first
    heapq.heapify(todo)
    if stats is not None:
        stats.update(frontier_explored=front.explored, frontier_seconds=time.perf_counter() - t0,
                     frontier_subtrees=len(todo), workers=nworkers, tasks=0, task_seconds=[], task_cpu_seconds=[])
    if progress:
        progress(res.explored)

    inflight: dict = {}                 # future -> (first key of its subtrees, the schedules it may run)
    slots = 2 * nworkers
    pool = distributed.as_completed()

    def submit() -> None:
        while todo and len(inflight) < slots:
            free = max_schedules - res.explored - sum(cap for _, cap in inflight.values())
            if free < 1:
                return
            take = -(-len(todo) // slots)                    # the queue shared out among the slots
            batch = [heapq.heappop(todo) for _ in range(take)]
            cap = max(1, free // (slots - len(inflight)))
            fut = client.submit(run_task, spec, batch, cap, chunk_seconds, pure=False)
            inflight[fut] = (batch[0].key, cap)
            pool.add(fut)
            if stats is not None:
                stats["tasks"] += 1

    submit()
    try:
        for fut in pool:
            first, _ = inflight.pop(fut)
            if fut.cancelled():
                continue
            try:
                out: SubtreeResult = fut.result()
            except UsageError:
                raise
            except Exception as e:  # noqa: BLE001 -- a worker that could not run the task: say which
                raise ExploreError(f"a Dask worker failed on a subtree at {first!r}: {type(e).__name__}: {e} "
                                   "(every worker needs this kvmsim installed, and a plugin file at the same "
                                   "path)") from None
            res.explored += out.explored
            if stats is not None:
                stats["task_seconds"].append(out.seconds)
                stats["task_cpu_seconds"].append(out.cpu_seconds)
            for left in out.left:
                if best is None or left.key < best.key:
                    heapq.heappush(todo, left)
            if out.found is not None and (best is None or out.found.key < best.key):
                best = out.found
                for f, (k, _) in list(inflight.items()):
                    if k > best.key:
                        f.cancel()
                todo = [s for s in todo if s.key < best.key]
                heapq.heapify(todo)
            if progress:
                progress(res.explored)
            submit()
    finally:
        for f in inflight:
            f.cancel()
    res.elapsed = time.perf_counter() - t0
    if best is not None:
        res.coverage = Coverage.STOPPED
        res.shortest = shrink(scenario, policy, mutations, list(best.schedule), best.invariant)
        res.violating = execute(scenario, policy, mutations, res.shortest)
    elif todo:
        res.coverage, res.pending = Coverage.TRUNCATED, len(todo)
    return res
