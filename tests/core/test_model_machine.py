"""A model-only state machine: random faults, host unmaps/madvise, dirty logging and memslot changes,
with every invariant (:class:`kvmsim.check.Checker`, quiescent) asserted after every rule.

The v6.13 series keeps every invariant on every path here, on each architecture; that is the claim
(a legacy run may legitimately break INV-2/3/12 on some of these paths, which the scenario library
pins).  A guest read after a write returns what was written unless the host dropped the page.
"""

from __future__ import annotations

import os

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvmsim.check import Checker
from kvmsim.errors import ModelError
from kvmsim.kvm.dirty import kvm_get_dirty_log
from kvmsim.kvm.memslot import KVM_MEM
from kvmsim.mm.vma import VmaKind
from tests.helpers import PAGE, make_vm
from tests.strategies import page_index, page_ranges, values, vma_kinds

NPAGES = 16
SIZE = NPAGES * PAGE
LOG = int(KVM_MEM.LOG_DIRTY_PAGES)


class ModelMachine(RuleBasedStateMachine):
    arch = "x86"

    @initialize(kind=vma_kinds)
    def setup(self, kind: VmaKind) -> None:
        self.host, self.kvm, _, _ = make_vm("series", arch=self.arch, size=0)
        self.kind = kind
        self.vma = self.host.mm.mmap(SIZE, kind)
        self.flags = 0
        self.gpa = 0
        self.slot = True
        self.kvm.set_user_memory_region(0, self.gpa, SIZE, self.vma.start, self.flags)
        self.vcpu = self.kvm.create_vcpu()
        self.checker = Checker(self.kvm)
        self.written: dict[int, int] = {}          # page → value the guest last stored (host kept it)

    def _set(self, gpa: int, flags: int) -> None:
        self.kvm.set_user_memory_region(0, gpa, SIZE, self.vma.start, flags)
        self.gpa, self.flags, self.slot = gpa, flags, True

    @precondition(lambda self: self.slot)
    @rule(page=page_index(NPAGES), value=values)
    def guest_write(self, page: int, value: int) -> None:
        if self.vcpu.write(self.gpa + page * PAGE, value).ok:
            self.written[page] = value

    @precondition(lambda self: self.slot)
    @rule(page=page_index(NPAGES))
    def guest_read(self, page: int) -> None:
        acc = self.vcpu.read(self.gpa + page * PAGE)
        if acc.ok and page in self.written:
            assert acc.value == self.written[page], f"page {page}: read {acc.value}, wrote {self.written[page]}"

    @rule(r=page_ranges(NPAGES))
    def madvise_dontneed(self, r: tuple[int, int]) -> None:
        first, n = r
        self.host.mm.madvise(self.vma.start + first * PAGE, n * PAGE, "DONTNEED")
        for p in range(first, first + n):
            if self.kind is VmaKind.ANON:          # private anon: the data is gone; shared/file keep it
                self.written.pop(p, None)

    @rule()
    def munmap_and_remap(self) -> None:
        start = self.vma.start
        self.host.mm.munmap(start, SIZE)
        self.vma = self.host.mm.mmap(SIZE, self.kind, addr=start)
        self.written.clear()

    @precondition(lambda self: self.slot)
    @rule(on=st.booleans())
    def dirty_logging(self, on: bool) -> None:
        self._set(self.gpa, LOG if on else 0)

    @precondition(lambda self: self.slot and self.flags & LOG)
    @rule()
    def get_dirty_log(self) -> None:
        kvm_get_dirty_log(self.kvm, 0)

    @precondition(lambda self: self.slot)
    @rule()
    def memslot_delete(self) -> None:
        self.kvm.set_user_memory_region(0, self.gpa, 0, self.vma.start)
        self.slot = False

    @precondition(lambda self: not self.slot)
    @rule(gpa=st.sampled_from([0, 1 << 30]))
    def memslot_create(self, gpa: int) -> None:
        self._set(gpa, 0)

    @precondition(lambda self: self.slot and not self.flags & LOG)
    @rule()
    def memslot_move(self) -> None:
        try:
            self._set((1 << 30) if self.gpa == 0 else 0, self.flags)
        except ModelError:                            # the arch refuses a move: state unchanged
            pass

    @invariant()
    def invariants_hold(self) -> None:
        if hasattr(self, "checker"):
            found = self.checker.run(quiescent=True)
            assert found == [], "\n".join(map(str, found))


class Arm64ModelMachine(ModelMachine):
    arch = "arm64"


class RiscvModelMachine(ModelMachine):
    arch = "riscv"


_SETTINGS = settings(max_examples=int(os.environ.get("KVMSIM_MODEL_MACHINE_EXAMPLES", "40")),
                     stateful_step_count=20, deadline=None)
for _m in (ModelMachine, Arm64ModelMachine, RiscvModelMachine):
    _m.TestCase.settings = _SETTINGS
TestModelMachineX86 = ModelMachine.TestCase
TestModelMachineArm64 = Arm64ModelMachine.TestCase
TestModelMachineRiscv = RiscvModelMachine.TestCase
