"""Step footprints for partial-order reduction (:mod:`kvmsim.explore.dpor`): what each step read and wrote.

Two steps of different threads *commute* when neither writes model state the other reads or
writes: running them in either order leaves the same state, and the explorer need not try both
orders (the basis of Flanagan–Godefroid DPOR, as in loom, shuttle and GenMC).  The reduction is
only as sound as the dependence relation, so the footprints are *recorded*, not declared:
:class:`Tracker` instruments the world the scenario built (no model file knows about it).

What a footprint holds (keys are stable across executions and processes, see :class:`Tracker`):

* every attribute read and written on a model object (``kvm.mmu_invalidate_seq``,
  ``lock.writer``, ``gpc.valid``, ``slot.dirty_bitmap`` ...): each object reachable from the world
  (and from the threads' generator frames) gets its class swapped for a subclass whose
  ``__getattribute__``/``__setattr__`` record ``(object, attribute)``;
* a mutable container reached through an attribute (a list of readers, a dict of memslots, a
  numpy array of SPTEs or of page refcounts) is a read of that attribute, and a *write* of it when
  its contents (hashed deeply, model objects by identity) differ after the step: in-place updates
  (``bits[i] = 0``, ``readers.append``) are writes though no attribute was assigned;
* unknown is dependent: an untracked object reached through an attribute counts as a container
  (its fields are hashed), and a step whose footprint cannot be taken would have to be treated as
  conflicting with everything (:data:`EVERYTHING`).

Left out on purpose: the :class:`~kvmsim.trace.Journal` (an observation log the checker reads; two
commuting steps record the same facts in the other order, and the validators judge each fact
from the state it names) and the :class:`~kvmsim.sched.Scheduler`'s active-thread slot (written by
every resume, read only to name lock holders, which the lock's own fields record).

Steps are compared by these keys only: a violation the checker sees in an intermediate state of one
order is seen in the other order's state after the same steps (the same state), not necessarily in
between.  The agreement test (tests/explore/test_por.py) checks the reduced search against the plain
DFS on every race x policy x mutation.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np

#: Classes whose instances are not model state (observation, scheduling) and stay untracked.
_EXCLUDED = {"Journal", "Scheduler", "Checker", "_FaultRelease", "Counter"}

_CALLABLE = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.BuiltinMethodType,
             staticmethod, classmethod, type)
_CONTAINERS = (list, dict, set, np.ndarray, bytearray)
_ATOMS = (int, float, str, bytes, bool, type(None), complex, frozenset, range)


@dataclass(frozen=True)
class Footprint:
    """What one step read and wrote: sets of ``(object key, attribute)``."""

    reads: frozenset = frozenset()
    writes: frozenset = frozenset()

    def conflicts(self, other: "Footprint") -> bool:
        """Dependent: one writes what the other reads or writes."""
        w, ow = self.writes, other.writes
        return not (w.isdisjoint(other.reads) and w.isdisjoint(ow) and ow.isdisjoint(self.reads))


#: The footprint of a step that could not be observed: it conflicts with every step.
EVERYTHING = Footprint(frozenset({("*", "*")}), frozenset({("*", "*")}))


def independent(a: Footprint, b: Footprint) -> bool:
    if a is EVERYTHING or b is EVERYTHING:
        return False
    return not a.conflicts(b)


# ---- the recorder ------------------------------------------------------------------------------------

class _Recording:
    """The footprint being recorded (one per process; only the explorer's ``execute`` turns it on)."""

    __slots__ = ("on", "keys", "reads", "writes", "containers", "published")

    def __init__(self) -> None:
        self.on = False
        self.keys: dict[int, tuple] = {}
        self.reads: set = set()
        self.writes: set = set()
        self.containers: dict = {}          # (key, attr) -> (container, hash at first read)
        self.published: list = []           # values assigned to tracked attributes


_REC = _Recording()
_TRACED: dict[type, type] = {}


def _deep_hash(v, keys: dict, depth: int = 0):
    if depth > 6:
        return ("deep",)
    t = type(v)
    if t in _ATOMS or isinstance(v, _ATOMS):
        return v
    k = keys.get(id(v))
    if k is not None:
        return k
    if t is np.ndarray or isinstance(v, np.ndarray):
        return (v.shape, v.dtype.num, v.tobytes())
    if isinstance(v, dict):
        return tuple((_deep_hash(a, keys, depth + 1), _deep_hash(b, keys, depth + 1)) for a, b in v.items())
    if isinstance(v, (list, tuple)):
        return tuple(_deep_hash(x, keys, depth + 1) for x in v)
    if isinstance(v, (set, frozenset)):
        return frozenset(_deep_hash(x, keys, depth + 1) for x in v)
    if isinstance(v, _CALLABLE) or callable(v) and not hasattr(v, "__dict__"):
        return ("fn", id(v))
    d = getattr(v, "__dict__", None)
    if d is not None:
        return (t.__name__, tuple((a, _deep_hash(b, keys, depth + 1)) for a, b in d.items()))
    slots = getattr(t, "__slots__", None)
    if slots:
        return (t.__name__, tuple(_deep_hash(getattr(v, s, None), keys, depth + 1) for s in slots))
    return (t.__name__, id(v))


def _traced(cls: type) -> type:
    """``cls`` with recording attribute access (same layout: ``__slots__ = ()``)."""
    sub = _TRACED.get(cls)
    if sub is not None:
        return sub
    oga = cls.__getattribute__
    osa = cls.__setattr__
    oda = cls.__delattr__
    rec = _REC

    def __getattribute__(self, name):
        v = oga(self, name)
        if rec.on and name[:2] != "__":
            t = type(v)
            if t in _ATOMS or t in _TRACED_SET:
                rec.reads.add((rec.keys.get(id(self)), name))
            elif isinstance(v, _CALLABLE) or t.__name__ in _EXCLUDED:
                pass
            else:
                k = (rec.keys.get(id(self)), name)
                rec.reads.add(k)
                if k not in rec.containers:
                    rec.containers[k] = (v, _deep_hash(v, rec.keys))
        return v

    def __setattr__(self, name, value):
        if rec.on:
            rec.writes.add((rec.keys.get(id(self)), name))
            if not isinstance(value, _ATOMS):
                rec.published.append(value)
        osa(self, name, value)

    def __delattr__(self, name):
        if rec.on:
            rec.writes.add((rec.keys.get(id(self)), name))
        oda(self, name)

    sub = type(cls.__name__, (cls,), {"__slots__": (), "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "__getattribute__": __getattribute__,
                                      "__setattr__": __setattr__, "__delattr__": __delattr__})
    _TRACED[cls] = sub
    _TRACED_SET.add(sub)
    return sub


_TRACED_SET: set[type] = set()


def _model_object(v) -> bool:
    t = type(v)
    return (t.__module__.startswith("kvmsim.") and t.__name__ not in _EXCLUDED and not isinstance(v, _CALLABLE)
            and not isinstance(v, (int, str, tuple, frozenset)) and hasattr(v, "__class__"))


class Tracker:
    """Footprints of the steps of one execution of one world.

    Keys: an object reachable when the threads start is keyed by its position in a deterministic
    walk of the world (the same in every execution of the same scenario, in any process); one
    published by a step is keyed by ``(step index, thread, n)``, deterministic for a given schedule
    prefix.  The walk swaps each model object's class for its recording subclass."""

    def __init__(self, roots: list) -> None:
        self.keys: dict[int, tuple] = {}
        self._keep: list = []                       # keep walked objects alive: ids stay unique
        self._walk(roots, lambda n: ("w", n))

    def _walk(self, roots, name) -> None:
        keys = self.keys
        stack = list(reversed(roots))
        seen: set[int] = set()
        n = 0
        while stack:
            v = stack.pop()
            i = id(v)
            if i in seen or isinstance(v, _ATOMS) or isinstance(v, _CALLABLE):
                continue
            seen.add(i)
            if isinstance(v, np.ndarray):
                continue
            if isinstance(v, types.GeneratorType):
                f = v.gi_frame
                if f is not None:
                    stack.extend(reversed([f.f_locals[k] for k in sorted(f.f_locals)]))
                continue
            if isinstance(v, dict):
                stack.extend(reversed(list(v.values())))
                continue
            if isinstance(v, (list, tuple, set, frozenset)):
                stack.extend(reversed(sorted(v, key=repr) if isinstance(v, (set, frozenset)) else list(v)))
                continue
            if not _model_object(v) or i in keys:
                continue
            cls = type(v)
            if cls not in _TRACED_SET:
                try:
                    object.__setattr__(v, "__class__", _traced(cls))
                except TypeError:                   # an incompatible layout: leave it untracked
                    continue
            keys[i] = name(n)
            n += 1
            self._keep.append(v)
            try:
                d = object.__getattribute__(v, "__dict__")
            except AttributeError:
                d = {}
            vals = [d[k] for k in d]
            for s in getattr(cls, "__slots__", ()) or ():
                try:
                    vals.append(object.__getattribute__(v, s))
                except AttributeError:
                    pass
            stack.extend(reversed(vals))

    def begin(self) -> None:
        rec = _REC
        rec.keys = self.keys
        rec.reads, rec.writes, rec.containers, rec.published = set(), set(), {}, []
        rec.on = True

    def end(self, step: int, thread: str) -> Footprint:
        """Stop recording; the step's footprint (and key whatever it published)."""
        rec = _REC
        rec.on = False
        writes = rec.writes
        for k, (v, h) in rec.containers.items():
            if k not in writes and _deep_hash(v, self.keys) != h:
                writes.add(k)
        fp = Footprint(frozenset(rec.reads), frozenset(writes))
        if writes:                                  # objects the step published into tracked state
            new = [v for k, (v, _) in rec.containers.items() if k in writes] + rec.published
            if new:
                self._walk(new, lambda n: ("s", step, thread, n))
        rec.reads, rec.writes, rec.containers, rec.published = set(), set(), {}, []
        return fp

    def stop(self) -> None:
        _REC.on = False
