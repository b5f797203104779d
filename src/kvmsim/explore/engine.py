"""Run a scenario under a schedule, and the schedulers: exhaustive (preemption-bounded DFS), random,
replay; plus shrinking of a violating schedule.

A *schedule* is the list of thread names to advance, one step (up to the next yield) each.  When it
runs out, or names a thread that is blocked or done (that entry is skipped), the run continues
without preemption: the current thread while it can run, else the first runnable one.  Generators
cannot be cloned, so every schedule re-executes from a fresh setup.  Printed as one argument,
run-length encoded: ``vcpu0*2,host*3,vcpu0``.

Completeness: a DFS that ran out of schedules to try is *complete* (no violation up to the bound is
a proof over the model); one that hit ``max_schedules`` first is *truncated* and says so, with the
number explored and how many prefixes were still queued.  Random and replay runs cover only what they
ran (*sampled*, *replay*).
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from kvmsim.check import Checker, Violation
from kvmsim.errors import UsageError
from kvmsim.sched import Thread


def format_schedule(names: list[str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(names):
        j = i
        while j < len(names) and names[j] == names[i]:
            j += 1
        out.append(names[i] if j - i == 1 else f"{names[i]}*{j - i}")
        i = j
    return ",".join(out)


#: Longest schedule ``--replay`` takes: far beyond any built-in race's step count.
MAX_SCHEDULE_STEPS = 10_000


def parse_schedule(text: str) -> list[str]:
    out: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, n = part.partition("*")
        if not name or (n and not n.isdigit()):
            raise UsageError(f"bad schedule element {part!r}: expected THREAD or THREAD*COUNT")
        count = int(n) if n else 1
        if len(out) + count > MAX_SCHEDULE_STEPS:
            raise UsageError(f"schedule element {part!r}: a schedule has at most {MAX_SCHEDULE_STEPS:,} steps")
        out.extend([name] * count)
    return out


@dataclass
class Step:
    thread: str
    label: str
    runnable: tuple[str, ...]


@dataclass
class Run:
    """One execution: the steps taken and the first watched violation, if any."""

    steps: list[Step] = field(default_factory=list)
    violation: Violation | None = None

    @property
    def schedule(self) -> list[str]:
        return [s.thread for s in self.steps]

    def preemptions(self) -> int:
        return count_preemptions(self.steps)


def count_preemptions(steps: list[Step]) -> int:
    n = 0
    for a, b in zip(steps, steps[1:]):
        if b.thread != a.thread and a.thread in b.runnable:
            n += 1
    return n


def execute(scenario, policy: str, mutations, schedule: list[str], *, strict: bool = False,
            chooser: Callable[[list[str], str | None], str] | None = None) -> Run:
    """Fresh setup, then the schedule, then the non-preemptive (or ``chooser``) continuation.

    The explorer is a strategy of the world's :class:`~kvmsim.sched.Scheduler`: it only picks the
    next thread; the scheduler resumes it."""
    world = scenario.build(policy, mutations)
    checker = Checker(world.kvm)
    checker.run(quiescent=False)                       # the setup's own state is not the race
    names = list(world.threads)
    run = Run()
    i = 0

    def choose(ready: list[str], current: str | None) -> str:
        nonlocal i
        while i < len(schedule):
            want = schedule[i]
            i += 1
            if want in ready:
                return want
            if strict:
                raise UsageError(f"schedule step {i} names {want!r}, which is "
                                 + ("blocked or finished" if want in names else "not a thread of this scenario")
                                 + f"; runnable: {', '.join(ready)}")
        return chooser(ready, current) if chooser else (current if current in ready else ready[0])

    def check(quiescent: bool) -> bool:
        for v in checker.run(quiescent=quiescent):
            if scenario.watch(v):
                run.violation = v
                return True
        return False

    def after(th: Thread, label: str, ready: tuple[str, ...]) -> bool:
        run.steps.append(Step(th.name, label, ready))
        world.kvm.journal.step = len(run.steps)
        return check(quiescent=False)

    world.kvm.sched.run(world.threads, choose, after)
    if run.violation is None:
        scenario.final(world)
        check(quiescent=True)
    return run


# ---- schedulers ------------------------------------------------------------------------------------

#: Default cap on the schedules one DFS executes (``kvmsim explore --max-schedules``).
MAX_SCHEDULES = 100_000


class Coverage(enum.Enum):
    """How much of the schedule space a search covered."""

    COMPLETE = "complete"        # DFS: every schedule within the preemption bound was run
    TRUNCATED = "truncated"      # DFS: stopped at max_schedules with schedules left to try
    STOPPED = "stopped"          # stopped at the first violation (the rest was not searched)
    SAMPLED = "sampled"          # random: the N schedules asked for
    REPLAY = "replay"            # one given schedule


@dataclass
class Result:
    explored: int = 0
    elapsed: float = 0.0
    violating: Run | None = None
    shortest: list[str] | None = None
    coverage: Coverage = Coverage.COMPLETE
    pending: int = 0             # prefixes still queued when a DFS was truncated
    max_schedules: int | None = None

    @property
    def complete(self) -> bool:
        """True when no violation means none exists within the bound (a finished DFS)."""
        return self.coverage is Coverage.COMPLETE

    def why(self) -> str:
        """One line on the coverage, for a human."""
        if self.coverage is Coverage.TRUNCATED:
            return (f"search incomplete: stopped at the schedule cap ({self.max_schedules:,}) after "
                    f"{self.explored:,} schedules, {self.pending:,} unexplored prefixes left; "
                    "raise --max-schedules or lower --bound")
        return {Coverage.COMPLETE: "search complete", Coverage.STOPPED: "search stopped at the first violation",
                Coverage.SAMPLED: f"{self.explored:,} random schedules (a sample, not a proof)",
                Coverage.REPLAY: "one replayed schedule"}[self.coverage]

    @property
    def rate(self) -> float:
        return self.explored / self.elapsed if self.elapsed > 0 else 0.0


def dfs(scenario, policy, mutations, bound: int, limit: int = MAX_SCHEDULES,
        result: Result | None = None) -> Iterator[Run]:
    """Every schedule with at most ``bound`` preemptions, each once (stateless DFS over prefixes).

    Stops after ``limit`` schedules; if prefixes were still queued then, ``result`` (when given) is
    marked :attr:`Coverage.TRUNCATED` with their number."""
    stack: list[list[str]] = [[]]
    n = 0
    while stack:
        if n >= limit:
            if result is not None:
                result.coverage, result.pending = Coverage.TRUNCATED, len(stack)
            return
        prefix = stack.pop()
        run = execute(scenario, policy, mutations, prefix)
        n += 1
        yield run
        steps = run.steps
        for j in range(len(steps) - 1, len(prefix) - 1, -1):
            for alt in steps[j].runnable:
                if alt == steps[j].thread:
                    continue
                cand = steps[:j] + [Step(alt, "", steps[j].runnable)]
                if count_preemptions(cand) <= bound:
                    stack.append([s.thread for s in cand])


def random_runs(scenario, policy, mutations, n: int, seed: int) -> Iterator[Run]:
    rng = random.Random(seed)
    for _ in range(n):
        yield execute(scenario, policy, mutations, [], chooser=lambda ready, cur: rng.choice(ready))


def shrink(scenario, policy, mutations, schedule: list[str], invariant: str) -> list[str]:
    """Shortest explicit schedule (default continuation after it) that still violates ``invariant``."""
    def bad(s: list[str]) -> bool:
        v = execute(scenario, policy, mutations, s).violation
        return v is not None and v.invariant == invariant

    best = list(schedule)
    for cut in range(len(best) + 1):                   # shortest prefix first
        if bad(best[:cut]):
            best = best[:cut]
            break
    changed = True
    while changed:
        changed = False
        for k in range(len(best)):
            cand = best[:k] + best[k + 1:]
            if bad(cand):
                best, changed = cand, True
                break
    return best


def explore(scenario, policy, mutations, *, bound: int | None = None, random_n: int | None = None,
            seed: int = 0, replay: list[str] | None = None, max_schedules: int = MAX_SCHEDULES,
            progress: Callable[[int], None] | None = None) -> Result:
    """Run a scheduler over ``scenario``; the result says what it found and how much it covered."""
    if max_schedules < 1:
        raise UsageError(f"max_schedules must be >= 1, got {max_schedules}")
    res = Result(max_schedules=max_schedules)
    t0 = time.perf_counter()
    if replay is not None:
        res.coverage = Coverage.REPLAY
        runs: Iterator[Run] = iter([execute(scenario, policy, mutations, replay, strict=True)])
    elif random_n is not None:
        res.coverage = Coverage.SAMPLED
        runs = random_runs(scenario, policy, mutations, random_n, seed)
    else:
        runs = dfs(scenario, policy, mutations, 2 if bound is None else bound, max_schedules, res)
    for run in runs:
        res.explored += 1
        if progress:
            progress(res.explored)
        if run.violation is not None:
            res.violating = run
            if res.coverage is Coverage.COMPLETE:
                res.coverage = Coverage.STOPPED
            break
    res.elapsed = time.perf_counter() - t0
    if res.violating is not None:
        res.shortest = (replay if replay is not None else
                        shrink(scenario, policy, mutations, res.violating.schedule,
                               res.violating.violation.invariant))
        if replay is None:
            res.violating = execute(scenario, policy, mutations, res.shortest)
    return res
