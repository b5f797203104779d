"""Kernel paths as steppable generators, and the scheduler that runs them (one per world).

A kernel path that can race (the page fault, an mmu_notifier invalidation, a dirty-log harvest,
aging, a pfncache refresh, ...) is written as a generator function decorated with :func:`kpath`.
It yields a label (a ``str`` in kernel vocabulary, e.g. ``"kvm_faultin_pfn: mmu_seq snapshot"``)
at every point where the kernel can be preempted or race, and :class:`Wait` where it would block
(a lock that is held).  Calling the decorated function runs it straight through and returns its
result; ``fn.steps(...)`` returns the generator, for :mod:`kvmsim.explore` and for scripted
interleavings.  Inside a kernel path, call another one with ``yield from other.steps(...)``.

:class:`Scheduler` is modelled on SimPy's ``Environment``: one object per world (the
:class:`~kvmsim.mm.host.Host` owns it, so every lock of every VM on that host reaches it) that
owns the *active thread* and is the only place a thread's generator is resumed
(:meth:`Scheduler.resume`, as SimPy's ``Process._resume``).  Choosing the next thread is a
strategy passed to :meth:`Scheduler.run`:

* straight through (:meth:`Scheduler.drive`, what calling a kernel path does): the active thread
  runs to completion without a switch; blocking there is a deadlock;
* a script (:meth:`Scheduler.run_interleaved`, the scenario ``interleave`` step and tests);
* the explorer's schedules (:func:`kvmsim.explore.engine.execute`).

Locks record their holders by the active thread's name (``sched.active``), so
``lockdep_assert_held`` works under interleaving.  :data:`DEFAULT_SCHEDULER` serves code that
runs outside any world.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from kvmsim.errors import KvmBug, ModelError

Steps = Generator[Any, None, Any]

#: The thread name outside any scheduled run (the scenario runner, a test, a benchmark).
MAIN = "main"


@dataclass(frozen=True)
class Wait:
    """Yielded by a path that cannot go on until ``ready()`` is true (a held lock)."""

    label: str
    ready: Callable[[], bool]


class Thread:
    """One kernel path being scheduled: its generator and where it stopped (SimPy's ``Process``)."""

    __slots__ = ("name", "gen", "started", "pending", "done", "result", "error")

    def __init__(self, name: str, gen: Steps):
        self.name = name
        self.gen = gen
        self.started = False
        self.pending: Any = None          # what it last yielded: a label or a Wait
        self.done = False
        self.result: Any = None
        self.error: ModelError | None = None

    @property
    def blocked(self) -> bool:
        p = self.pending
        return p.__class__ is Wait and not p.ready()


#: ``choose(runnable, previous) -> name``: a strategy picking the next thread to resume.
Chooser = Callable[[list[str], "str | None"], str]


def drive(gen: Steps, sched: "Scheduler | None" = None) -> Any:
    """Run a kernel path straight through in the active thread and return its result.

    The straight strategy of :class:`Scheduler`: no thread switch, so no scheduler state changes
    (this is the hot path: every page fault a benchmark takes runs here).  Blocking with nobody to
    wake us is a deadlock in a straight run: raise instead of spin."""
    send = gen.send
    try:
        item = send(None)
        while True:
            if item.__class__ is Wait and not item.ready():
                gen.close()
                who = sched.active if sched is not None else "a straight-run path"
                raise KvmBug(f"deadlock: {who} blocks at {item.label!r} with no other thread")
            item = send(None)
    except StopIteration as stop:
        return stop.value


class Scheduler:
    """The world's scheduler: owns the active thread and the only ``resume`` (SimPy's ``Environment``)."""

    def __init__(self) -> None:
        self.active = MAIN

    def __repr__(self) -> str:
        return f"<Scheduler active={self.active!r}>"

    # ---- the one place a scheduled thread is resumed --------------------------------------------
    def resume(self, th: Thread) -> str:
        """Advance ``th`` by one step (up to and including its next yield) as the active thread.

        Returns a label for the step: what it yielded (``" (blocked)"`` after a :class:`Wait`),
        ``returns …`` when it finished, ``fails: …`` when it raised a :class:`ModelError` (kept in
        ``th.error``; the strategy decides whether that ends the run)."""
        prev = self.active
        self.active = th.name
        th.started = True
        try:
            item = th.gen.send(None)
        except StopIteration as stop:
            th.done, th.result = True, stop.value
            return f"returns {stop.value!r}"
        except ModelError as e:                    # the path failed cleanly (e.g. -EFAULT, KVM_BUG_ON)
            th.done, th.error = True, e
            return f"fails: {e}"
        finally:
            self.active = prev
        th.pending = item
        return item.label + " (blocked)" if item.__class__ is Wait else str(item)

    def drive(self, gen: Steps) -> Any:
        """Straight strategy: run ``gen`` to completion in the active thread (see :func:`drive`)."""
        return drive(gen, self)

    # ---- strategies --------------------------------------------------------------------------------
    def run(self, threads: dict[str, Steps] | dict[str, Thread], choose: Chooser,
            after: Callable[[Thread, str, tuple[str, ...]], bool] | None = None) -> dict[str, Thread]:
        """Run ``threads`` until all finish, resuming the one ``choose(runnable, previous)`` names.

        ``threads`` maps names to generators (or to :class:`Thread` objects the strategy keeps).
        ``after(thread, label, runnable)`` is called after every step; a true return stops the run
        early.  Raises :class:`KvmBug` when every live thread is blocked (a deadlock)."""
        ths = spawn(threads)
        order = list(ths)
        prev: str | None = None
        while True:
            ready = [n for n in order if not ths[n].done and not ths[n].blocked]
            if not ready:
                live = sorted(n for n in order if not ths[n].done)
                if not live:
                    return ths
                for n in live:                         # nothing is left half-run behind the report
                    ths[n].gen.close()
                raise KvmBug(f"deadlock: {live} all blocked")
            name = choose(ready, prev)
            th = ths[name]
            label = self.resume(th)
            prev = name
            if after is not None and after(th, label, tuple(ready)):
                return ths

    def run_interleaved(self, threads: dict[str, Steps], order: Iterable[str]) -> dict[str, Any]:
        """Scripted strategy: advance the threads ``order`` names, one step each, then every
        remaining one round-robin (in the order given) to completion.

        A script that names a thread which has finished, or one that blocks (``Wait`` not ready), is
        impossible: the threads still run to completion round-robin (a lock taken or an invalidation
        begun is never left behind), then :class:`KvmBug` names the first impossible step.  A thread
        raising :class:`ModelError` raises it.  Returns each thread's result."""
        ths = spawn(threads)
        names = list(ths)
        script = iter(enumerate(order, 1))
        cursor = 0
        bad: list[str] = []

        def choose(ready: list[str], _prev: str | None) -> str:
            nonlocal cursor
            if not bad:
                for k, want in script:
                    if want not in ths or ths[want].done:
                        bad.append(f"schedule step {k} names {want!r}, which has finished or does not exist")
                    elif want not in ready:
                        bad.append(f"schedule step {k} steps {want} while it blocks at {ths[want].pending.label!r}")
                    else:
                        return want
                    break
            n = len(names)
            for k in range(n):                         # round robin from after the last one it ran
                cand = names[(cursor + k) % n]
                if cand in ready:
                    cursor = (cursor + k + 1) % n
                    return cand
            raise AssertionError("run() passes a non-empty runnable list")

        def after(th: Thread, _label: str, _ready: tuple[str, ...]) -> bool:
            if th.error is not None:
                raise th.error
            return False

        self.run(ths, choose, after)
        if bad:
            raise KvmBug(bad[0])
        return {name: th.result for name, th in ths.items()}


def spawn(threads: dict[str, Steps] | dict[str, Thread]) -> dict[str, Thread]:
    """``{name: Thread}`` for a mapping of names to generators (threads are passed through)."""
    return {name: g if isinstance(g, Thread) else Thread(name, g) for name, g in threads.items()}


#: The scheduler for code that runs outside any world (a bare kernel path in a unit test).
DEFAULT_SCHEDULER = Scheduler()


def run_interleaved(threads: dict[str, Steps], order: Iterable[str], *, sched: Scheduler) -> dict[str, Any]:
    """:meth:`Scheduler.run_interleaved` on ``sched``, the world's (``kvm.sched``): the one whose
    active thread the VM's locks record."""
    return sched.run_interleaved(threads, order)


class KPath:
    """A kernel path: callable straight through, or as steps via :meth:`steps`."""

    def __init__(self, fn: Callable[..., Steps]):
        self._fn = fn
        #: ``steps(...)``: the generator, for ``yield from`` (the generator function itself: a
        #: forwarding method would cost the fault path a call per step entered).
        self.steps = fn
        self._attr: str | None = None                # the class attribute it is bound under
        functools.update_wrapper(self, fn)

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return drive(self._fn(*args, **kwargs))

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        bound = _BoundKPath(self._fn, obj)
        # Cache it on the instance (a non-data descriptor is shadowed by the instance dict), like a
        # bound method the interpreter would not rebuild: the fault path looks these up per page.
        if self._attr is not None:
            try:
                obj.__dict__[self._attr] = bound
            except AttributeError:                   # no instance dict (__slots__)
                pass
        return bound


class _BoundKPath:
    __slots__ = ("_fn", "_obj", "steps")

    def __init__(self, fn: Callable[..., Steps], obj: Any):
        self._fn = fn
        self._obj = obj
        self.steps = functools.partial(fn, obj)      # the generator for ``yield from``, bound to ``obj``

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return drive(self._fn(self._obj, *args, **kwargs))


def kpath(fn: Callable[..., Steps]) -> KPath:
    """Decorator: mark a generator function as a steppable kernel path."""
    return KPath(fn)
