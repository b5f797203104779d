"""The objects a scenario's steps act on: the :class:`Env` (host, VM, named things) and a step's :class:`Res`."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from kvmsim.errors import ModelError, errno_name

@dataclass
class Res:
    """What one step did: ``result`` (a short word), ``errno`` (0 or a positive errno), ``value``."""

    result: str
    errno: int = 0
    value: Any = None
    per_page: list[str] = field(default_factory=list)

    @property
    def errno_name(self) -> str | None:
        return errno_name(self.errno) if self.errno else None


# ---- argument schemas --------------------------------------------------------------------------------


# ---- the environment a scenario runs in ------------------------------------------------------------------

class Env:
    """The host, the VM and the named objects a scenario's steps refer to."""

    def __init__(self, host, kvm, vmas: dict[str, dict]):
        self.host = host
        self.kvm = kvm
        self.vmas = vmas                # name → {"start", "size", "mapping", "kind"}
        self.maps: dict[str, Any] = {}
        self.pages: dict[str, int | None] = {}
        self.gpcs: dict[str, Any] = {}
        self.children: list = []
        self.gmems: dict[str, Any] = {}  # guest_memfd files by name (kvmsim.scenarios.ops_gmem)

    @property
    def mm(self):
        return self.host.mm

    def vma(self, name: str) -> dict:
        if name not in self.vmas:
            raise ModelError(errno.EINVAL, f"no VMA named {name!r}")
        return self.vmas[name]

    def hva(self, name: str, offset: int = 0) -> int:
        return self.vma(name)["start"] + offset

    def span(self, a: dict) -> tuple[int, int]:
        v = self.vma(a["vma"])
        size = a["size"] if a.get("size") is not None else v["size"] - a["offset"]
        return v["start"] + a["offset"], size

    def vcpu(self, i: int):
        if not 0 <= i < len(self.kvm.vcpus):
            raise ModelError(errno.EINVAL, f"no vCPU {i} (the VM has {len(self.kvm.vcpus)})")
        return self.kvm.vcpus[i]

    def slot(self, sid: int):
        s = self.kvm.memslots[0].by_id.get(sid)
        if s is None:
            raise ModelError(errno.EINVAL, f"no memslot {sid}")
        return s

    def mapping(self, name: str):
        asp = self.vma(name)["mapping"]
        if asp is None:
            raise ModelError(errno.EINVAL, f"VMA {name!r} has no file mapping (anon or driver memory)")
        return asp


def _flags(names) -> int:
    from kvmsim.scenarios.loader import MEM_FLAGS
    out = 0
    for n in names:
        out |= MEM_FLAGS[n]
    return out


def _done(label: str):
    yield label
