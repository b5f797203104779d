"""The in-project x86-64 encoder (backend/kvm/guest.py) against GNU as / objdump encodings."""

from __future__ import annotations

import struct

import pytest

from kvmsim.backend.kvm import guest
from kvmsim.backend.kvm.guest import Asm

# (builder, bytes) pairs; the bytes are GNU as 2.46 output (objdump -d -M intel).
VECTORS = [
    (lambda a: a.mov_imm64("rbx", 0x100000), "48 bb 00 00 10 00 00 00 00 00"),
    (lambda a: a.mov_imm64("r15", 0x1122334455667788), "49 bf 88 77 66 55 44 33 22 11"),
    (lambda a: a.mov_imm64("rax", -1), "48 b8 ff ff ff ff ff ff ff ff"),
    (lambda a: a.mov_load("rdi", "rbx"), "48 8b 3b"),
    (lambda a: a.mov_load("rax", "rcx"), "48 8b 01"),
    (lambda a: a.mov_load("rax", "rdi"), "48 8b 07"),
    (lambda a: a.mov_load("r8", "r12"), "4d 8b 04 24"),
    (lambda a: a.mov_load("rax", "rbp"), "48 8b 45 00"),
    (lambda a: a.mov_load("rdx", "rsp", 8), "48 8b 54 24 08"),
    (lambda a: a.mov_store("rdi", "rax"), "48 89 07"),
    (lambda a: a.mov_store("rcx", "rax"), "48 89 01"),
    (lambda a: a.mov_store("r13", "r9"), "4d 89 4d 00"),
    (lambda a: a.mov_store("rax", "rbx", 0x1000), "48 89 98 00 10 00 00"),
    (lambda a: a.add_imm("rbx", 8), "48 83 c3 08"),
    (lambda a: a.add_imm("rcx", 8), "48 83 c1 08"),
    (lambda a: a.add_imm("r9", 0x1000), "49 81 c1 00 10 00 00"),
    (lambda a: a.add("rax", "rdx"), "48 01 d0"),
    (lambda a: a.add("r10", "r11"), "4d 01 da"),
    (lambda a: a.cmp("rbx", "rsi"), "48 39 f3"),
    (lambda a: a.cmp("r8", "rax"), "49 39 c0"),
    (lambda a: a.mov_al_imm8(0x0E), "b0 0e"),
    (lambda a: a.out_al(0x10), "e6 10"),
    (lambda a: a.out_al(0xEE), "e6 ee"),
    (lambda a: a.hlt(), "f4"),
]


@pytest.mark.parametrize("build,expected", VECTORS, ids=[v[1] for v in VECTORS])
def test_encoding_matches_gnu_as(build, expected):
    a = Asm()
    build(a)
    assert a.assemble() == bytes.fromhex(expected)


def test_jb_short_near_and_forward():
    # top: hlt; jb top; 200 x nop; jb top; jb fwd; hlt; fwd: hlt   (GNU as: 72 fd / 0f 82 2f ff ff ff)
    a = Asm()
    a.label("top").hlt().jb("top")
    a.buf += b"\x90" * 200
    a.jb("top").jb("fwd").hlt().label("fwd").hlt()
    code = a.assemble()
    assert code[1:3] == bytes.fromhex("72 fd")
    assert code[203:209] == bytes.fromhex("0f 82 2f ff ff ff")
    assert code[209:215] == bytes.fromhex("0f 82 01 00 00 00")


def test_labels_honour_origin():
    a = Asm(origin=0x1000)
    a.jb("end").label("end").hlt()
    assert a.labels["end"] == 0x1006
    assert a.assemble() == bytes.fromhex("0f 82 00 00 00 00 f4")


def test_bad_register_and_undefined_label_are_value_errors():
    with pytest.raises(ValueError, match="eax"):
        Asm().mov_load("eax", "rbx")
    with pytest.raises(ValueError, match="nowhere"):
        Asm().jb("nowhere").assemble()


def test_write_program_is_the_expected_loop():
    code, entries = guest.programs()
    start = entries["write"] - guest.BOOT_CODE
    expected = bytes.fromhex(
        "48 bb 00 00 10 00 00 00 00 00"      # mov rbx, BOOT_ADDRS
        "48 b9 00 00 20 00 00 00 00 00"      # mov rcx, BOOT_VALS
        "48 39 f3 0f 82 03 00 00 00"         # cmp rbx, rsi; jb loop
        "e6 10 f4"                           # out 0x10, al; hlt   (empty list)
        "48 8b 3b 48 8b 01 48 89 07"         # loop: mov rdi,[rbx]; mov rax,[rcx]; mov [rdi],rax
        "48 83 c3 08 48 83 c1 08"            # add rbx, 8; add rcx, 8
        "48 39 f3 72 ea"                     # cmp rbx, rsi; jb loop (-22)
        "e6 10 f4")                          # out 0x10, al; hlt
    assert code[start:start + len(expected)] == expected


def test_idt_gate_points_at_its_stub():
    raw = guest.idt()
    lo, sel, _ist, attr, mid, hi, _ = struct.unpack_from("<HHBBHII", raw, 14 * 16)
    assert sel == guest.SEL_CODE and attr == 0x8E
    assert lo | mid << 16 | hi << 32 == guest.BOOT_STUBS + 14 * guest.STUB_SIZE
    stub = guest.exception_stubs()[14 * guest.STUB_SIZE:15 * guest.STUB_SIZE]
    assert stub.startswith(bytes.fromhex("b0 0e e6 ee f4"))
