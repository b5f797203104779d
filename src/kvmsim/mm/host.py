"""The host: physical memory, the VMM process's address space and its drivers, with one journal.

:class:`Host` is what a scenario builds first; VMs (:class:`kvmsim.kvm.kvm.Kvm`) are created on it.
"""

from __future__ import annotations

from kvmsim.mm.driver import Driver
from kvmsim.mm.mm import Mm
from kvmsim.mm.page import PfnClass, PhysMem
from kvmsim.sched import Scheduler
from kvmsim.trace import Journal


class Host:
    """A host machine with one VMM process."""

    def __init__(self, *, recording: bool = True, hugetlb_pool_pages: int | None = None):
        self.sched = Scheduler()          # the world's scheduler: active thread, the only resume
        self.journal = Journal(recording=recording)
        self.phys = PhysMem(self.journal)
        self.mm = Mm(self.phys, self.journal, sched=self.sched)
        self.drivers: dict[str, Driver] = {}
        self.hugetlb_pool_pages = hugetlb_pool_pages

    def add_driver(self, name: str, npages: int, pfn_class: PfnClass | str, **kw) -> Driver:
        if isinstance(pfn_class, str):
            pfn_class = PfnClass[pfn_class.upper()]
        drv = Driver(self.phys, name, npages, pfn_class, **kw)
        self.drivers[name] = drv
        return drv
