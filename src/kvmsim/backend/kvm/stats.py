"""Binary statistics of a VM or vCPU fd (virt/kvm/binary_stats.c, ``KVM_GET_STATS_FD``).

The fd holds ``struct kvm_stats_header``, an id string, ``num_desc`` descriptors (``struct kvm_stats_desc``
followed by a ``name_size``-byte name) and the data block; each stat is ``size`` u64 values at
``data_offset + desc.offset``.  VM stats include ``pages_4k`` and ``mmu_pte_write``; vCPU stats include
``insn_emulation`` and ``exits``.
"""

from __future__ import annotations

import ctypes
import os
import struct

from kvmsim.backend.kvm import abi, ioctls
from kvmsim.backend.kvm.libc import close_quietly


class StatsFd:
    """A parsed stats fd: descriptors read once, values re-read on every ``read()``."""

    def __init__(self, owner_fd: int, what: str):
        self.fd = ioctls.ioctl(owner_fd, ioctls.KVM_GET_STATS_FD, name=f"KVM_GET_STATS_FD({what})")
        try:
            self._parse_descriptors()
        except BaseException:
            close_quietly(self.fd)
            raise

    def _parse_descriptors(self) -> None:
        raw = os.pread(self.fd, ctypes.sizeof(abi.kvm_stats_header), 0)
        hdr = abi.kvm_stats_header.from_buffer_copy(raw)
        self.id = os.pread(self.fd, hdr.name_size, hdr.id_offset).split(b"\0")[0].decode()
        desc_len = ctypes.sizeof(abi.kvm_stats_desc) + hdr.name_size
        blob = os.pread(self.fd, desc_len * hdr.num_desc, hdr.desc_offset)
        self._data_offset = hdr.data_offset
        self.layout: dict[str, tuple[int, int]] = {}       # name -> (offset, size)
        end = 0
        for i in range(hdr.num_desc):
            chunk = blob[i * desc_len:(i + 1) * desc_len]
            d = abi.kvm_stats_desc.from_buffer_copy(chunk)
            name = chunk[ctypes.sizeof(abi.kvm_stats_desc):].split(b"\0")[0].decode()
            self.layout[name] = (d.offset, d.size)
            end = max(end, d.offset + 8 * d.size)
        self._data_size = end

    def read(self) -> dict[str, int | tuple[int, ...]]:
        """Every stat: an int for a scalar, a tuple for a histogram."""
        data = os.pread(self.fd, self._data_size, self._data_offset)
        out: dict[str, int | tuple[int, ...]] = {}
        for name, (off, size) in self.layout.items():
            vals = struct.unpack_from(f"<{size}Q", data, off)
            out[name] = vals[0] if size == 1 else vals
        return out

    def close(self) -> None:
        if self.fd >= 0:
            close_quietly(self.fd)
            self.fd = -1
