"""Kernel paths as steppable generators: one implementation, run straight through or interleaved.

A kernel path that can race (the page fault, an mmu_notifier invalidation, a dirty-log harvest,
aging, a pfncache refresh, ...) is written as a generator function decorated with :func:`kpath`.
It yields a label (a ``str`` in kernel vocabulary, e.g. ``"kvm_faultin_pfn: mmu_seq snapshot"``)
at every point where the kernel can be preempted or race, and :class:`Wait` where it would block
(a lock that is held).  Calling the decorated function runs it straight through and returns its
result; ``fn.steps(...)`` returns the generator, for :mod:`kvmsim.explore` and for scripted
interleavings in tests.  Inside a kernel path, call another one with ``yield from other.steps(...)``.

``current_thread()`` names the thread the scheduler is running (``"main"`` outside any
scheduler); locks record their holders by that name so ``lockdep_assert_held`` works under
interleaving.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from kvmsim.errors import KvmBug

Steps = Generator[Any, None, Any]

_current = ["main"]


def current_thread() -> str:
    """The name of the thread whose kernel path is executing now."""
    return _current[0]


def set_current_thread(name: str) -> str:
    """Switch the current thread (used by schedulers); returns the previous name."""
    prev = _current[0]
    _current[0] = name
    return prev


@dataclass(frozen=True)
class Wait:
    """Yielded by a path that cannot go on until ``ready()`` is true (a held lock)."""

    label: str
    ready: Callable[[], bool]


def drive(gen: Steps) -> Any:
    """Run a kernel path straight through and return its result.

    Blocking with nobody to wake us is a deadlock in a single-threaded run: raise instead of spin.
    """
    send = gen.send
    try:
        item = send(None)
        while True:
            if item.__class__ is Wait and not item.ready():
                gen.close()
                raise KvmBug(f"deadlock: {current_thread()} blocks at {item.label!r} with no other thread")
            item = send(None)
    except StopIteration as stop:
        return stop.value


class KPath:
    """A kernel path: callable straight through, or as steps via :meth:`steps`."""

    def __init__(self, fn: Callable[..., Steps]):
        self._fn = fn
        self._attr: str | None = None                # the class attribute it is bound under
        functools.update_wrapper(self, fn)

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return drive(self._fn(*args, **kwargs))

    def steps(self, *args: Any, **kwargs: Any) -> Steps:
        return self._fn(*args, **kwargs)

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
    __slots__ = ("_fn", "_obj")

    def __init__(self, fn: Callable[..., Steps], obj: Any):
        self._fn = fn
        self._obj = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return drive(self._fn(self._obj, *args, **kwargs))

    def steps(self, *args: Any, **kwargs: Any) -> Steps:
        return self._fn(self._obj, *args, **kwargs)


def kpath(fn: Callable[..., Steps]) -> KPath:
    """Decorator: mark a generator function as a steppable kernel path."""
    return KPath(fn)


def run_interleaved(threads: dict[str, Steps], order: Iterable[str]) -> dict[str, Any]:
    """Run several kernel paths in a scripted order, then each remaining one to completion.

    ``order`` names the thread to advance by one step at a time (a step runs up to and including
    the next yield).  A script that names a thread which has finished, or one that blocks (``Wait``
    not ready), is impossible: the threads still run to completion (a lock taken or an
    invalidation begun is never left behind), then ``KvmBug`` names the first impossible step.
    Returns each thread's result.
    """
    results: dict[str, Any] = {}
    pending: dict[str, Any] = {}
    live = dict(threads)
    bad: str | None = None

    def advance(name: str) -> None:
        gen = live[name]
        prev = set_current_thread(name)
        try:
            pending[name] = gen.send(None) if name in pending else next(gen)
        except StopIteration as stop:
            results[name] = stop.value
            del live[name]
        finally:
            set_current_thread(prev)

    def blocked(name: str) -> bool:
        waiting = pending.get(name)
        return isinstance(waiting, Wait) and not waiting.ready()

    for k, name in enumerate(order):
        if name not in live:
            bad = f"schedule step {k + 1} names {name!r}, which has finished or does not exist"
            break
        if blocked(name):
            bad = f"schedule step {k + 1} steps {name} while it blocks at {pending[name].label!r}"
            break
        advance(name)
    while live:
        progressed = False
        for name in list(live):
            if blocked(name):
                continue
            advance(name)
            progressed = True
        if not progressed:
            for gen in live.values():
                gen.close()
            raise KvmBug(f"deadlock: {sorted(live)} all blocked")
    if bad is not None:
        raise KvmBug(bad)
    return results
