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
  numpy array of SPTEs or of page refcounts) is a read of that attribute, and a *write* of it by
  whichever later step changes its contents (hashed deeply, model objects by identity; every
  container ever reached is re-hashed after every step): in-place updates (``bits[i] = 0``,
  ``readers.append``) are writes though no attribute was assigned, also through a reference a
  thread kept in its frame across a yield; for the same reason a step reads every container its
  thread's frames (the ``yield from`` chain) refer to when it begins;
* unknown is dependent: an untracked object reached through an attribute counts as a container
  (its fields are hashed), and a step whose footprint cannot be taken would have to be treated as
  conflicting with everything (:data:`EVERYTHING`).

Left out on purpose: lookup caches (:data:`_CACHES`), the :class:`~kvmsim.trace.Journal` (an observation log the checker reads; two
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

#: Attributes that are lookup caches: a hit returns what the lookup would have found, so reading or
#: updating one changes no result (``KvmMemslots.last_used_slot``, ``__gfn_to_memslot()``'s
#: ``slots->last_used_slot``).  Recording them would make every memslot lookup a write.
_CACHES = frozenset({"last_used_slot"})

#: Lock classes with ``writer`` / ``readers`` holder fields (kvm/kvm.py, mm/mm.py).
_LOCKS = {"MmuLock", "MmapLock"}

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
    if t.__module__.startswith("kvmsim."):
        # a model object: the initial walk and every step's publications track them (their fields
        # are recorded on access), so one seen here is by identity
        return (t.__name__, id(v))
    d = getattr(v, "__dict__", None)
    if d is not None:
        return (t.__name__, tuple((a, _deep_hash(b, keys, depth + 1)) for a, b in d.items()))
    slots = getattr(t, "__slots__", None)
    if slots:
        return (t.__name__, tuple(_deep_hash(getattr(v, s, None), keys, depth + 1) for s in slots))
    return (t.__name__, id(v))


class _Array(tuple):
    """A numpy array's snapshot: (shape, dtype number, bytes)."""

    def __new__(cls, shape, num, data):
        return tuple.__new__(cls, (shape, num, data))


_ATOM_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex, frozenset, range})


def _flat(x) -> bool:
    t = type(x)
    return t in _ATOM_TYPES or t in _TRACED_SET


def _snap(v, keys: dict):
    """A comparable snapshot of container ``v``: a shallow copy when it holds only atoms and tracked
    model objects (compared in C, objects by identity first), else its deep hash."""
    t = type(v)
    if t is np.ndarray:
        return _Array(v.shape, v.dtype.num, v.tobytes())
    if t is list or t is set:
        if all(_flat(x) for x in v):
            return t(v)
    elif t is dict:
        if all(_flat(x) for x in v.values()) and all(_flat(x) for x in v):
            return dict(v)
    return ("deep", _deep_hash(v, keys))


def _same(v, snap, keys: dict) -> bool:
    if type(snap) is _Array:
        return type(v) is np.ndarray and v.shape == snap[0] and v.dtype.num == snap[1] and v.tobytes() == snap[2]
    if type(snap) is tuple:
        return ("deep", _deep_hash(v, keys)) == snap
    return type(v) is type(snap) and v == snap


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
        if rec.on and name[:2] != "__" and name not in _CACHES:
            t = type(v)
            if t in _ATOMS or t in _TRACED_SET:
                rec.reads.add((rec.keys.get(id(self)), name))
            elif isinstance(v, _CALLABLE) or t.__name__ in _EXCLUDED:
                pass
            else:
                k = (rec.keys.get(id(self)), name)
                rec.reads.add(k)
                if k not in rec.containers:
                    rec.containers[k] = (v, _snap(v, rec.keys))
        return v

    def __setattr__(self, name, value):
        if rec.on and name not in _CACHES:
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

    def __init__(self, roots: list, threads: dict | None = None) -> None:
        self.threads = threads or {}                # name -> generator: the frames that keep aliases
        self.keys: dict[int, tuple] = {}
        self._keep: list = []                       # keep walked objects alive: ids stay unique
        self._walk(roots, lambda n: ("w", n))
        #: The world's locks (``mmu_lock``, ``mmap_lock``): their holders before each step tell DPOR
        #: which threads a step could not have run before (they would block: not co-enabled).
        self.locks = [(self.keys[id(o)], o) for o in self._keep if type(o).__name__ in _LOCKS]
        self._containers: dict[tuple, list] = {}    # (key, id) -> [key, container, snapshot after the last step]
        self._aliases: dict[str, frozenset] = {}    # thread -> keys of the containers its frames hold

    def holders(self) -> dict:
        """``{lock key: (writer, readers)}`` now (read without recording)."""
        ga = object.__getattribute__
        return {k: (ga(o, "writer"), tuple(ga(o, "readers"))) for k, o in self.locks}

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
        """Stop recording; the step's footprint (and key whatever it published).

        Containers outlive the step that reached them: a thread keeps ``pfns, bits =
        mmu._tables(slot)`` in its frame across a yield and writes through it later with no attribute
        access.  So every container ever reached is re-checked after every step (a change is a write
        of that step), and a step reads every container its thread's frames held when it began."""
        rec = _REC
        rec.on = False
        keys, reg, writes = self.keys, self._containers, rec.writes
        for k, (v, h) in rec.containers.items():
            reg.setdefault((k, id(v)), [k, v, h])
        changed = []
        for ent in reg.values():
            if not _same(ent[1], ent[2], keys):
                ent[2] = _snap(ent[1], keys)
                writes.add(ent[0])
                changed.append(ent[1])
        held = self._aliases.get(thread)
        fp = Footprint(frozenset(rec.reads | held) if held else frozenset(rec.reads), frozenset(writes))
        self._aliases[thread] = self._held(thread)
        new = changed + rec.published               # objects the step published into tracked state
        if new:
            self._walk(new, lambda n: ("s", step, thread, n))
        rec.reads, rec.writes, rec.containers, rec.published = set(), set(), {}, []
        return fp

    def _held(self, thread: str) -> frozenset:
        """Keys of the containers ``thread``'s generator frames (the ``yield from`` chain) refer to
        directly (or in a tuple or list): it can read them in its next step with no attribute access."""
        ids: set[int] = set()
        g = self.threads.get(thread)
        while g is not None:
            f = getattr(g, "gi_frame", None)
            if f is None:
                break
            for v in f.f_locals.values():
                ids.add(id(v))
                if type(v) is tuple or type(v) is list:
                    ids.update(id(x) for x in v)
            g = getattr(g, "gi_yieldfrom", None)
        return frozenset(ent[0] for (_, i), ent in self._containers.items() if i in ids)

    def stop(self) -> None:
        _REC.on = False
