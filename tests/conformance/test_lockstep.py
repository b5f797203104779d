"""Lock-step state machines: random operation sequences applied to two backends at once.

``TestLockstep``: the model (series) against the real /dev/kvm.  Without a usable /dev/kvm it skips
with the reason (``KVMSIM_REAL_KVM=1`` makes that a failure; ``=0`` skips it); it never silently
compares the model with itself.  ``TestPolicyAgreement``: model-series against model-legacy, which
must also agree (nothing here depends on the page-reference protocol), and says so by its name.
The first divergence fails, and Hypothesis prints the shortened sequence as replayable steps.
"""

import os

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmsim.backend.availability import kvm_available, real_kvm_mode
from kvmsim.backend.base import Madv, ManualProtect, MemoryRegion, Prot, VmOptions
from kvmsim.backend.conformance import model_backend, real_backend
from kvmsim.types import Gpa
from tests.strategies import backend_mapping_kinds, page_index, page_ranges, page_sets, values

GPA = 1 << 30
NPAGES = 64
pages = page_sets(NPAGES)

_REAL = [None]


def _real():
    if _REAL[0] is None:
        b, why = real_backend()
        if b is None:
            pytest.fail(f"the real backend is not usable ({why}); KVMSIM_REAL_KVM=1 forces it")
        _REAL[0] = b
    return _REAL[0]


class Lockstep(RuleBasedStateMachine):
    """Two backends, one sequence; ``second()`` names the backend compared with the model under ``FIRST``
    (None: the host's own protocol, ``conformance.host_protocol()``)."""

    FIRST: str | None = None

    @staticmethod
    def second():
        return _real()

    @initialize(kind=backend_mapping_kinds, manual=st.booleans())
    def setup(self, kind, manual):
        self.backends = [model_backend(self.FIRST), self.second()]
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

    @rule(p=pages, value=values)
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
    @rule(r=page_ranges(NPAGES))
    def dontneed(self, r):
        first, n = r
        self._same("madvise", lambda b, m: b.host_madvise(m, Madv.MADV_DONTNEED, first * 4096, n * 4096).errno)

    @precondition(lambda self: self.live)
    @rule()
    def toggle_write_protection(self):
        self.prot_rw = not self.prot_rw
        prot = Prot.PROT_READ | (Prot.PROT_WRITE if self.prot_rw else Prot.PROT_NONE)
        self._same("mprotect", lambda b, m: b.host_mprotect(m, prot).errno)

    @precondition(lambda self: self.live)
    @rule(page=page_index(NPAGES), value=values)
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


class PolicyAgreement(Lockstep):
    """Model-series against model-legacy: the same guest- and host-visible results."""

    FIRST = "series"

    @staticmethod
    def second():
        return model_backend("legacy")


_SETTINGS = settings(max_examples=int(os.environ.get("KVMSIM_LOCKSTEP_EXAMPLES", "300")),
                     stateful_step_count=12, deadline=None)
Lockstep.TestCase.settings = _SETTINGS
PolicyAgreement.TestCase.settings = _SETTINGS

_KVM_OK, _KVM_WHY = kvm_available()
TestLockstep = pytest.mark.skipif(not _KVM_OK and real_kvm_mode() != "force",      # forced: _real() fails
                                  reason=f"real /dev/kvm not usable: {_KVM_WHY}")(Lockstep.TestCase)
TestPolicyAgreement = PolicyAgreement.TestCase
