"""The tiny long-mode guest: an x86-64 encoder for the handful of instructions it needs, its programs and
its boot image (page tables, GDT, IDT), following the layout of KVM selftests' lib/x86/processor.c.

The encoder covers exactly: ``mov r64, imm64``, ``mov r64, [r64+disp]``, ``mov [r64+disp], r64``,
``add r64, r64``, ``add r64, imm``, ``cmp r64, r64``, ``jb``, ``mov al, imm8``, ``out imm8, al`` and
``hlt`` (Intel SDM vol. 2 encodings; tests compare them with GNU as output).

Boot slot layout (guest physical == guest virtual, 2 MiB pages, see ``BOOT_*`` below)::

    0x001000  code: PROG_WRITE, PROG_READ, PROG_HLT
    0x002000  PML4          0x003000  PDPT          0x004000  PD pool (PD_POOL pages, 1 GiB each)
    0x044000  IDT (256 gates)   0x045000  exception stubs   0x046000  GDT   0x047000  stack page
    0x100000  address list (u64 gpas)        0x200000  value list (u64)   up to BOOT_GPA_END

``PROG_WRITE`` stores ``vals[i]`` to ``*addrs[i]``; ``PROG_READ`` loads ``*addrs[i]`` into ``vals[i]``; for
``i`` in ``[0, n)`` with ``n`` passed as the end pointer in ``rsi``.  Both end with ``out 0x10, al; hlt``.
An exception enters stub ``v``: ``mov al, v; out 0xEE, al; hlt``.
"""

from __future__ import annotations

import struct

from kvmsim.backend.base import BOOT_GPA_END

REGS = {name: i for i, name in enumerate(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}


def _reg(name: str) -> int:
    try:
        return REGS[name]
    except KeyError:
        raise ValueError(f"not a 64-bit general purpose register: {name!r}") from None


def _fits8(v: int) -> bool:
    return -128 <= v <= 127


class Asm:
    """A one-pass x86-64 encoder with labels; ``assemble()`` resolves forward jumps."""

    def __init__(self, origin: int = 0):
        self.origin = origin
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self._fixups: list[tuple[int, str]] = []   # (offset of rel32, label)

    @property
    def here(self) -> int:
        return self.origin + len(self.buf)

    def label(self, name: str) -> Asm:
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice")
        self.labels[name] = self.here
        return self

    def _rex_w(self, reg: int, rm: int) -> None:
        self.buf.append(0x48 | ((reg >> 3) << 2) | (rm >> 3))

    def _modrm_mem(self, reg: int, base: int, disp: int) -> None:
        low = base & 7
        if disp == 0 and low != 5:
            mod, tail = 0, b""
        elif _fits8(disp):
            mod, tail = 1, struct.pack("<b", disp)
        else:
            mod, tail = 2, struct.pack("<i", disp)
        self.buf.append((mod << 6) | ((reg & 7) << 3) | low)
        if low == 4:
            self.buf.append(0x24)              # SIB: no index, base = rsp/r12
        self.buf += tail

    def mov_imm64(self, dst: str, imm: int) -> Asm:
        """``mov r64, imm64`` (REX.W B8+r io)."""
        d = _reg(dst)
        self.buf.append(0x48 | (d >> 3))
        self.buf.append(0xB8 | (d & 7))
        self.buf += struct.pack("<Q", imm & (2**64 - 1))
        return self

    def mov_load(self, dst: str, base: str, disp: int = 0) -> Asm:
        """``mov r64, [base + disp]`` (REX.W 8B /r)."""
        d, b = _reg(dst), _reg(base)
        self._rex_w(d, b)
        self.buf.append(0x8B)
        self._modrm_mem(d, b, disp)
        return self

    def mov_store(self, base: str, src: str, disp: int = 0) -> Asm:
        """``mov [base + disp], r64`` (REX.W 89 /r)."""
        s, b = _reg(src), _reg(base)
        self._rex_w(s, b)
        self.buf.append(0x89)
        self._modrm_mem(s, b, disp)
        return self

    def _alu_rr(self, opcode: int, dst: str, src: str) -> Asm:
        d, s = _reg(dst), _reg(src)
        self._rex_w(s, d)
        self.buf.append(opcode)
        self.buf.append(0xC0 | ((s & 7) << 3) | (d & 7))
        return self

    def add(self, dst: str, src: str) -> Asm:
        """``add r64, r64`` (REX.W 01 /r)."""
        return self._alu_rr(0x01, dst, src)

    def cmp(self, a: str, b: str) -> Asm:
        """``cmp a, b`` (REX.W 39 /r: flags of a - b)."""
        return self._alu_rr(0x39, a, b)

    def add_imm(self, dst: str, imm: int) -> Asm:
        """``add r64, imm8`` (REX.W 83 /0 ib) or ``add r64, imm32`` (REX.W 81 /0 id)."""
        d = _reg(dst)
        self._rex_w(0, d)
        if _fits8(imm):
            self.buf += bytes([0x83, 0xC0 | (d & 7)]) + struct.pack("<b", imm)
        else:
            self.buf += bytes([0x81, 0xC0 | (d & 7)]) + struct.pack("<i", imm)
        return self

    def jb(self, target: str) -> Asm:
        """``jb target``: 72 cb when a known target is near, else 0F 82 cd."""
        if target in self.labels:
            rel = self.labels[target] - (self.here + 2)
            if _fits8(rel):
                self.buf += bytes([0x72]) + struct.pack("<b", rel)
                return self
            self.buf += bytes([0x0F, 0x82]) + struct.pack("<i", self.labels[target] - (self.here + 6))
            return self
        self.buf += bytes([0x0F, 0x82])
        self._fixups.append((len(self.buf), target))
        self.buf += b"\0\0\0\0"
        return self

    def mov_al_imm8(self, imm: int) -> Asm:
        """``mov al, imm8`` (B0 ib)."""
        self.buf += bytes([0xB0, imm & 0xFF])
        return self

    def out_al(self, port: int) -> Asm:
        """``out imm8, al`` (E6 ib)."""
        self.buf += bytes([0xE6, port & 0xFF])
        return self

    def hlt(self) -> Asm:
        self.buf.append(0xF4)
        return self

    def assemble(self) -> bytes:
        for off, target in self._fixups:
            if target not in self.labels:
                raise ValueError(f"undefined label {target!r}")
            rel = self.labels[target] - (self.origin + off + 4)
            self.buf[off:off + 4] = struct.pack("<i", rel)
        self._fixups.clear()
        return bytes(self.buf)


# --- boot layout --------------------------------------------------------------------------------
BOOT_CODE = 0x1000
BOOT_PML4 = 0x2000
BOOT_PDPT = 0x3000
BOOT_PD_POOL = 0x4000
PD_POOL = 64                             # page directories: up to 64 distinct GiB of gpa space
BOOT_IDT = 0x44000
BOOT_STUBS = 0x45000
BOOT_GDT = 0x46000
BOOT_STACK_TOP = 0x48000
BOOT_ADDRS = 0x100000
BOOT_VALS = 0x200000
BOOT_LIST_MAX = (0x100000) // 8           # accesses per guest run (131072)
BOOT_SIZE = BOOT_GPA_END

PORT_DONE = 0x10
PORT_EXCEPTION = 0xEE
SEL_CODE = 0x08
SEL_DATA = 0x10
STUB_SIZE = 8


def _loop_program(a: Asm, body) -> None:
    a.mov_imm64("rbx", BOOT_ADDRS).mov_imm64("rcx", BOOT_VALS)
    a.cmp("rbx", "rsi")                  # n == 0: nothing to do
    a.jb("loop")
    a.out_al(PORT_DONE).hlt()
    a.label("loop")
    a.mov_load("rdi", "rbx")
    body(a)
    a.add_imm("rbx", 8).add_imm("rcx", 8)
    a.cmp("rbx", "rsi").jb("loop")
    a.out_al(PORT_DONE).hlt()


def programs() -> tuple[bytes, dict[str, int]]:
    """The code page image and the entry point of each program."""
    image = bytearray()
    entries = {}

    def emit(name, build):
        a = Asm(BOOT_CODE + len(image))
        entries[name] = a.here
        build(a)
        image.extend(a.assemble())

    emit("write", lambda a: _loop_program(a, lambda b: b.mov_load("rax", "rcx").mov_store("rdi", "rax")))
    emit("read", lambda a: _loop_program(a, lambda b: b.mov_load("rax", "rdi").mov_store("rcx", "rax")))
    emit("hlt", lambda a: a.out_al(PORT_DONE).hlt())
    return bytes(image), entries


def exception_stubs() -> bytes:
    """256 stubs of ``STUB_SIZE`` bytes: ``mov al, vector; out 0xEE, al; hlt``."""
    out = bytearray()
    for vec in range(256):
        stub = Asm().mov_al_imm8(vec).out_al(PORT_EXCEPTION).hlt().assemble()
        out += stub.ljust(STUB_SIZE, b"\xf4")
    return bytes(out)


def idt() -> bytes:
    """256 64-bit interrupt gates (type 0xE, present, DPL 0) pointing at the stubs."""
    out = bytearray()
    for vec in range(256):
        off = BOOT_STUBS + vec * STUB_SIZE
        out += struct.pack("<HHBBHII", off & 0xFFFF, SEL_CODE, 0, 0x8E, (off >> 16) & 0xFFFF,
                           off >> 32, 0)
    return bytes(out)


def gdt() -> bytes:
    """Null, 64-bit code (0x08) and flat data (0x10) descriptors."""
    return struct.pack("<QQQ", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)


def pde_2m(gpa: int) -> int:
    """A 2 MiB identity PDE: present, writable, PS."""
    return (gpa & ~((1 << 21) - 1)) | 0x83
