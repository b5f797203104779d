"""A lock-step state machine: random operation sequences applied to two backends at once.

Against the real /dev/kvm when it is usable (model vs real), otherwise model-series vs model-legacy
(which must also agree: nothing here depends on the page-reference protocol on an emulating host).
The first divergence fails, and Hypothesis prints the shortened sequence as replayable steps.
"""

import os

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmsim.backend.base import Madv, ManualProtect, MappingKind, MemoryRegion, Prot, VmOptions
from kvmsim.backend.conformance import model_backend, real_backend
from kvmsim.types import Gpa

GPA = 1 << 30
NPAGES = 64
KINDS = [MappingKind.ANON_SHARED, MappingKind.ANON_PRIVATE, MappingKind.MEMFD]
pages = st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=8, unique=True)

_REAL = [None]


def _second():
    if _REAL[0] is None:
        b, _ = real_backend()
        _REAL[0] = b or False
    return _REAL[0] or model_backend("legacy")


class Lockstep(RuleBasedStateMachine):
    @initialize(kind=st.sampled_from(KINDS), manual=st.booleans())
    def setup(self, kind, manual):
        self.backends = [model_backend("series"), _second()]
        self.kind = kind
        self.manual = manual
        self.live = True
        self.prot_rw = True
        opts = VmOptions(manual_protect=ManualProtect.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE if manual else ManualProtect(0))
        self.maps = []
        for b in self.backends:
            b.create_vm(opts)
            m = b.host_mmap(kind, NPAGES * 4096).mapping
            assert b.set_memory_region(MemoryRegion(1, Gpa(GPA), NPAGES * 4096, m.hva, 1)).errno == 0
            self.maps.append(m)

    def teardown(self):
        for b, m in zip(getattr(self, "backends", []), getattr(self, "maps", [])):
            try:
                b.set_memory_region(MemoryRegion(1, Gpa(GPA), 0, m.hva))
                if self.live:
                    b.host_munmap(m)
            except Exception:
                pass

    def _same(self, what, fn):
        outs = [fn(b, m) for b, m in zip(self.backends, self.maps)]
        assert outs[0] == outs[1], f"{what}: {self.backends[0].name}={outs[0]!r} {self.backends[1].name}={outs[1]!r}"
        return outs[0]

    @rule(p=pages, value=st.integers(1, 2**40))
    def guest_write(self, p, value):
        self._same("guest_write", lambda b, m: [a.exit for a in b.guest_write([GPA + i * 4096 for i in p], value).accesses])

    @rule(p=pages)
    def guest_read(self, p):
        self._same("guest_read", lambda b, m: [(a.exit, a.value) for a in b.guest_read([GPA + i * 4096 for i in p]).accesses])

    @rule()
    def get_dirty_log(self):
        self._same("get_dirty_log", lambda b, m: b.get_dirty_log(1))

    @precondition(lambda self: self.manual)
    @rule(chunk=st.integers(0, NPAGES // 64 - 1))
    def clear_dirty_log(self, chunk):
        self._same("clear_dirty_log", lambda b, m: b.clear_dirty_log(1, chunk * 64, 64).errno)

    @precondition(lambda self: self.live)
    @rule(first=st.integers(0, NPAGES - 1), n=st.integers(1, 8))
    def dontneed(self, first, n):
        n = min(n, NPAGES - first)
        self._same("madvise", lambda b, m: b.host_madvise(m, Madv.MADV_DONTNEED, first * 4096, n * 4096).errno)

    @precondition(lambda self: self.live)
    @rule()
    def toggle_write_protection(self):
        self.prot_rw = not self.prot_rw
        prot = Prot.PROT_READ | (Prot.PROT_WRITE if self.prot_rw else Prot.PROT_NONE)
        self._same("mprotect", lambda b, m: b.host_mprotect(m, prot).errno)

    @precondition(lambda self: self.live)
    @rule(page=st.integers(0, NPAGES - 1), value=st.integers(1, 2**40))
    def host_write(self, page, value):
        self._same("host_write", lambda b, m: b.host_write(m, page * 4096, value.to_bytes(8, "little")).signal)

    @precondition(lambda self: self.live)
    @rule()
    def munmap_and_remap(self):
        new = []
        for b, m in zip(self.backends, self.maps):
            assert b.host_munmap(m).errno == 0
            new.append(b.host_mmap(self.kind, NPAGES * 4096, hva=m.hva).mapping)
        self.maps = new
        self.prot_rw = True

    @invariant()
    def same_slots(self):
        if hasattr(self, "backends"):
            assert sorted(self.backends[0].memslots()) == sorted(self.backends[1].memslots())


Lockstep.TestCase.settings = settings(max_examples=int(os.environ.get("KVMSIM_LOCKSTEP_EXAMPLES", "300")),
                                      stateful_step_count=12, deadline=None)
TestLockstep = Lockstep.TestCase
