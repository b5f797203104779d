"""s390 nested virtualization: the vSIE's pinning of guest 2's control blocks (arch/s390/kvm/vsie.c,
Linux v6.12 and v6.13).

When guest 2 executes SIE, ``kvm_s390_handle_vsie()`` pins the SIE control block (SCB) guest 2
wrote (``pin_scb()``), shadows it, pins the satellite blocks the SCB points at (``pin_blocks()``:
SCA, ITDB, GVRD, RICCB, SDNX), runs guest 3 (``vsie_run()``), and then unpins everything
(``unpin_blocks()``, ``unshadow_scb()`` writing the intercept back into guest 2's SCB,
``unpin_scb()``).  Every pin is ``pin_guest_page()`` = ``gfn_to_page()``; every unpin is
``unpin_guest_page()``: release the page dirty and ``mark_page_dirty()`` the gfn "always as dirty
for migration".

What the series changed here (kvm-semantics.md §2.11, series-patch-map.md rows 1, 75, 80, 85)::

    v6.12                                          | v6.13
    page = gfn_to_page(kvm, gfn);                  | page = gfn_to_page(kvm, gfn);
      gfn_to_pfn(): hva_to_pfn_remapped() takes    |   kvm_follow_pfn(): a remapped pfn gives
      kvm_try_get_pfn() on a VM_PFNMAP/VM_IO pfn   |   refcounted_page == NULL (patch 85), so
      with a refcounted struct page; the page is   |   gfn_to_page() returns NULL (patch 75)
      kvm_pfn_to_refcounted_page(pfn), or          |
      KVM_ERR_PTR_BAD_PAGE                         |
    if (is_error_page(page)) return -EINVAL;       | if (!page) return -EINVAL;      (patch 1)
    ...                                            | ...
    kvm_release_pfn_dirty(hpa >> PAGE_SHIFT);      | kvm_release_page_dirty(pfn_to_page(hpa >> PAGE_SHIFT));
    mark_page_dirty(kvm, gpa_to_gfn(gpa));         | mark_page_dirty(kvm, gpa_to_gfn(gpa));   (patch 80)

So an SCB or satellite block in driver memory (VM_PFNMAP / VM_IO|VM_MIXEDMAP with a refcounted
struct page, e.g. a driver's own pages) is pinned by v6.12 through a reference KVM takes on a page
it does not own (INV-1, INV-8), dirtied and put at unpin; v6.13 refuses it and the vSIE entry fails:
a PGM_ADDRESSING program interrupt for the SCB (``pin_scb()``), a validity intercept for a satellite
block (reason 0x0034 SCA, 0x0080 ITDB, 0x1310 GVRD, 0x0043 RICCB, 0x10b0 SDNX).  A refcount-0
remapped page (TTM non-compound tails) fails in both: v6.12 because ``get_page_unless_zero()`` fails
(KVM_PFN_ERR_FAULT → KVM_ERR_PTR_BAD_PAGE), v6.13 because the page is NULL.  The other way round, a
PG_reserved page GUP accepts (VM_MIXEDMAP without VM_IO, normal PTEs) is refused by v6.12's guess
after GUP took a reference, which leaks, and pinned by v6.13, which returns the page it got (patch 75
"KVM: Convert gfn_to_page() to use kvm_follow_pfn()").  Patch 80 releases the
same page (``kvm_pfn_to_refcounted_page()`` of a page ``gfn_to_page()`` returned is that page), so
its difference is the path, not the effect: v6.12's marks come from the guess (``Src.GUESS``,
``kvm_release_pfn_dirty``), v6.13's from the page held (``Src.HELD``, ``kvm_release_page_dirty``).
The policy picks one of :func:`unpin_guest_page_release_v612` / :func:`unpin_guest_page_release_v613`
once per VM (``kvm.ops.vsie_unpin_release``).

In both versions a pinned page stays pinned while guest 3 runs, with no mmu_notifier protection;
the mmu_notifier does not know about it::

    CPU0 (guest 2's SIE, v6.12)               | CPU1 (the driver tears its memory down)
    pin_scb(): kvm_try_get_pfn() +1 on P      |
    vsie_run(): guest 3 runs                  |
                                              | zap the VMA, free P to the driver's pool
    unshadow_scb(): write the icpt into P     |  (use after free)
    unpin_scb(): SetPageDirty(P), put_page(P) |  (use after free, refcount underflow)

Modelled: ``kvm_s390_handle_vsie()`` from the SCB address on (its 512-byte alignment check →
PGM_SPECIFICATION), ``get_vsie_page()``'s "same SCB already in use by another vCPU → do nothing",
``pin_scb()`` / ``unpin_scb()``, ``pin_blocks()`` / ``unpin_blocks()`` with their address and
alignment validity checks, ``pin_guest_page()`` / ``unpin_guest_page()``, ``unshadow_scb()``'s write
of the intercept code into guest 2's SCB.  The SCB's fields are the step's arguments (guest memory
holds one value per page in the model), and giving a satellite block stands for the SCB (and
guest 2's facilities) enabling it: ECB_TE for the ITDB, ECA_VX without ECD_HOSTREGMGMT for the GVRD,
ECB3_RI for the RICCB, ECB_GS or ECD_ETOKENF for the SDNX; the SCA origin is 64-bit
(KVM_S390_VM_CPU_FEAT_64BSCAO).

Not modelled: ``shadow_scb()``'s checks and copies (``prepare_cpuflags()`` validity intercepts,
crycb, ibc, facility list), the SCA-in-prefix check (validity 0x0011: the model has no prefix), the
shadow gmap (``acquire_gmap_shadow()``, ``gmap_shadow()``, ``kvm_s390_shadow_fault()``,
``map_prefix()``) and everything guest 3 does in SIE (``do_vsie_run()``: its faults, intercepts,
machine checks), vsie page reuse across SCBs (``kvm->arch.vsie.pages``), PSTATE (PGM_PRIVILEGED_OP)
and the SIEF2 facility (-EOPNOTSUPP).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntEnum

from kvmsim.errors import ModelError
from kvmsim.kvm.dirty import mark_page_dirty_in_slot
from kvmsim.kvm.pfn import Hold, gfn_to_page, gfn_to_page_released, kvm_release_page_dirty, kvm_release_pfn
from kvmsim.sched import Steps, kpath
from kvmsim.types import PAGE_SHIFT, PAGE_SIZE

PAGE_MASK = ~(PAGE_SIZE - 1)
#: ``sizeof(struct bsca_block)`` (arch/s390/include/asm/kvm_host.h): a 64-byte header and 64 16-byte entries.
BSCA_BLOCK_SIZE = 0x40 + 64 * 0x10


class Icpt(IntEnum):
    """Intercept codes (arch/s390/kvm/kvm-s390.h ``ICPT_*``)."""

    INST = 0x04
    PROGI = 0x08
    VALIDITY = 0x20


class Pgm(IntEnum):
    """Program-interruption codes guest 2 gets (arch/s390/include/uapi/asm/kvm.h / asm/kvm_host.h ``PGM_*``)."""

    ADDRESSING = 0x05
    SPECIFICATION = 0x06


class VsieOutcome(IntEnum):
    """How ``kvm_s390_handle_vsie()`` ended for guest 2 (it returns 0 to KVM_RUN in every case here)."""

    RAN = 0              # guest 3 ran; guest 2 sees guest 3's intercept
    PROGRAM = 1          # a program interrupt injected into guest 2
    VALIDITY = 2         # a validity intercept in guest 2's SCB
    BUSY = 3             # the SCB is in use by another vCPU: "simply do nothing"


@dataclass
class ScbFields:
    """What guest 2 wrote into its SCB, as ``pin_blocks()`` reads it (``READ_ONCE(scb_o->...)``).

    ``None`` means the block is not in use (its origin is 0 or the SCB does not enable it)."""

    sca: int | None = None          # scaoh << 32 | scaol (64BSCAO)
    itdba: int | None = None        # with ECB_TE
    gvrd: int | None = None         # with ECA_VX and without ECD_HOSTREGMGMT
    riccbd: int | None = None       # with ECB3_RI
    sdnxo: int | None = None        # origin | size class (sdnxc), with ECB_GS or ECD_ETOKENF
    icptcode: int = Icpt.INST       # the intercept guest 3 exits SIE with


#: The satellite blocks in ``pin_blocks()`` / ``unpin_blocks()`` order.
SATELLITES = ("sca", "itdba", "gvrd", "riccbd", "sdnx")


@dataclass
class VsiePage:
    """Model of ``struct vsie_page``: the pinned original SCB (``scb_o`` as the host physical address
    ``pin_guest_page()`` returned), the shadow SCB's satellite origins (host physical addresses, 0 when
    not pinned) and the guest addresses they came from (``sca_gpa`` ...), the shadow's intercept."""

    scb_gpa: int
    vcpu: object
    scb_o: int = 0
    scb_s: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SATELLITES, 0))
    satellite_gpa: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SATELLITES, 0))
    icptcode: int = 0
    ipb: int = 0


@dataclass
class VsieResult:
    """What one vSIE entry did, for a scenario step: the outcome, the program-interruption code or
    validity reason, and the errno of the failing ``pin_guest_page()`` (0 when nothing failed)."""

    outcome: VsieOutcome
    code: int = 0
    errno: int = 0


# ---- pin_guest_page / unpin_guest_page -----------------------------------------------------------------

def pin_guest_page(kvm, gpa: int, user: str) -> tuple[int, int]:
    """Mirrors ``pin_guest_page()`` (arch/s390/kvm/vsie.c, v6.12 and v6.13): ``gfn_to_page()``; no page
    is -EINVAL (v6.12 ``is_error_page()``, v6.13 ``!page`` since patch 1 "KVM: Drop KVM_ERR_PTR_BAD_PAGE
    and instead return NULL to indicate an error"); else ``*hpa = page_to_phys(page) + (gpa &
    ~PAGE_MASK)``.  Returns ``(rc, hpa)``; ``user`` names the block for the trace."""
    page = gfn_to_page(kvm, gpa >> PAGE_SHIFT, user=user)
    if page is None:
        return -errno.EINVAL, 0
    return 0, (page << PAGE_SHIFT) + (gpa & ~PAGE_MASK)


def unpin_guest_page(kvm, gpa: int, hpa: int, vcpu=None) -> None:
    """Mirrors ``unpin_guest_page()``: the release resolved for this VM (``kvm.ops.vsie_unpin_release``:
    v6.12 ``kvm_release_pfn_dirty(hpa >> PAGE_SHIFT)``, v6.13 ``kvm_release_page_dirty(pfn_to_page(hpa
    >> PAGE_SHIFT))``, patch 80 "KVM: s390: Use kvm_release_page_dirty() to unpin "struct page"
    memory"), then ``mark_page_dirty(kvm, gpa_to_gfn(gpa))`` "always as dirty for migration"
    (``vcpu``: the running vCPU, whose dirty ring gets the entry)."""
    gfn = gpa >> PAGE_SHIFT
    gfn_to_page_released(kvm, hpa >> PAGE_SHIFT)
    kvm.ops.vsie_unpin_release(kvm, hpa, gfn)
    mark_page_dirty_in_slot(kvm, kvm.gfn_to_memslot(gfn), gfn, vcpu)


def unpin_guest_page_release_v612(kvm, hpa: int, gfn: int) -> None:
    """v6.12 ``unpin_guest_page()``'s release: ``kvm_release_pfn_dirty(hpa >> PAGE_SHIFT)``, i.e.
    ``kvm_pfn_to_refcounted_page()`` guesses the page from the pfn, then SetPageDirty, mark accessed
    and put.  Replaced by patch 80 "KVM: s390: Use kvm_release_page_dirty() to unpin "struct page" memory"."""
    kvm_release_pfn(kvm, hpa >> PAGE_SHIFT, True, "kvm_release_pfn_dirty", gfn=gfn)


def unpin_guest_page_release_v613(kvm, hpa: int, gfn: int) -> None:
    """v6.13 ``unpin_guest_page()``'s release: ``kvm_release_page_dirty(pfn_to_page(hpa >> PAGE_SHIFT))``
    on the page ``gfn_to_page()`` returned (patch 80 "KVM: s390: Use kvm_release_page_dirty() to unpin
    "struct page" memory")."""
    kvm_release_page_dirty(kvm, hpa >> PAGE_SHIFT, Hold.GET, "kvm_release_page_dirty", gfn=gfn)


# ---- the SCB and its satellite blocks -----------------------------------------------------------------

def set_validity_icpt(vsie_page: VsiePage, reason_code: int) -> int:
    """Mirrors ``set_validity_icpt()``: ``ipa = 0x1000``, ``ipb = reason << 16``, ``icptcode =
    ICPT_VALIDITY``; returns 1 ("control has to be given to guest 2")."""
    vsie_page.ipb = reason_code << 16
    vsie_page.icptcode = Icpt.VALIDITY
    return 1


def _pin_block(vcpu, vsie_page: VsiePage, name: str, gpa: int, reason: int) -> int:
    """One ``rc = pin_guest_page(vcpu->kvm, gpa, &hpa); if (rc) rc = set_validity_icpt(scb_s, reason);``
    block of ``pin_blocks()``, storing the hpa in the shadow SCB and the gpa in the vsie page."""
    rc, hpa = pin_guest_page(vcpu.kvm, gpa, user=f"pin_blocks({name})")
    if rc:
        return set_validity_icpt(vsie_page, reason)
    vsie_page.satellite_gpa[name] = gpa
    vsie_page.scb_s[name] = hpa
    return 0


def _sca_checks(gpa: int) -> int:
    """``pin_blocks()``'s SCA checks before pinning: the reason code, or 0."""
    if gpa < 2 * PAGE_SIZE:
        return 0x0038
    if (gpa & PAGE_MASK) != ((gpa + BSCA_BLOCK_SIZE - 1) & PAGE_MASK):
        return 0x003B
    return 0


def _sdnx_checks(gpa: int, sdnxc: int) -> int:
    """``pin_blocks()``'s SDNX checks: origin, size class 6..12, alignment to the size."""
    if not gpa or gpa < 2 * PAGE_SIZE:
        return 0x10B0
    if sdnxc < 6 or sdnxc > 12:
        return 0x10B1
    if gpa & ((1 << sdnxc) - 1):
        return 0x10B2
    return 0


def pin_blocks(vcpu, vsie_page: VsiePage, scb: ScbFields) -> int:
    """Mirrors ``pin_blocks()``: SCA, ITDB, GVRD, RICCB and SDNX, each after its address checks, each
    failure a validity intercept, and on any failure ``unpin_blocks()`` of what was pinned.  Returns 0
    or 1 (guest 2 gets the intercept)."""
    blocks = (
        # name, origin, its mask, the reason for a low origin / failing checks, the reason for a failed pin
        ("sca", scb.sca, ~0xF, None, 0x0034),
        ("itdba", scb.itdba, ~0xFF, 0x0080, 0x0080),
        ("gvrd", scb.gvrd, ~0x1FF, 0x1310, 0x1310),
        ("riccbd", scb.riccbd, ~0x3F, 0x0043, 0x0043),
    )
    rc = 0
    for name, origin, mask, low, pin_reason in blocks:
        gpa = (origin or 0) & mask
        if not gpa:
            continue
        bad = _sca_checks(gpa) if name == "sca" else (low if gpa < 2 * PAGE_SIZE else 0)
        rc = set_validity_icpt(vsie_page, bad) if bad else _pin_block(vcpu, vsie_page, name, gpa, pin_reason)
        if rc:
            break
    if not rc and scb.sdnxo is not None:
        gpa, sdnxc = scb.sdnxo & ~0xF, scb.sdnxo & 0xF
        bad = _sdnx_checks(gpa, sdnxc)
        rc = set_validity_icpt(vsie_page, bad) if bad else _pin_block(vcpu, vsie_page, "sdnx", gpa, 0x10B0)
    if rc:
        unpin_blocks(vcpu, vsie_page)
    return rc


def unpin_blocks(vcpu, vsie_page: VsiePage) -> None:
    """Mirrors ``unpin_blocks()``: every satellite with a non-zero hpa in the shadow SCB is unpinned
    (marked dirty) and cleared."""
    for name in SATELLITES:
        hpa = vsie_page.scb_s[name]
        if hpa:
            unpin_guest_page(vcpu.kvm, vsie_page.satellite_gpa[name], hpa, vcpu)
            vsie_page.satellite_gpa[name] = 0
            vsie_page.scb_s[name] = 0


def pin_scb(vcpu, vsie_page: VsiePage, gpa: int) -> int:
    """Mirrors ``pin_scb()``: ``pin_guest_page()``; on failure ``kvm_s390_inject_program_int(vcpu,
    PGM_ADDRESSING)`` and 1, else ``scb_o = phys_to_virt(hpa)`` and 0."""
    rc, hpa = pin_guest_page(vcpu.kvm, gpa, user="pin_scb")
    if rc:
        return 1
    vsie_page.scb_o = hpa
    return 0


def unpin_scb(vcpu, vsie_page: VsiePage, gpa: int) -> None:
    """Mirrors ``unpin_scb()``: ``unpin_guest_page()`` of the SCB (marked dirty) if it was pinned."""
    if vsie_page.scb_o:
        unpin_guest_page(vcpu.kvm, gpa, vsie_page.scb_o, vcpu)
    vsie_page.scb_o = 0


def unshadow_scb(vcpu, vsie_page: VsiePage) -> None:
    """Mirrors ``unshadow_scb()``'s interception part: ``scb_o->icptcode = scb_s->icptcode`` (and
    ipa/ipb ...), a store by KVM through the pinned page (the one value per page the model keeps)."""
    vcpu.kvm.phys.write(vsie_page.scb_o >> PAGE_SHIFT, int(vsie_page.icptcode), "unshadow_scb", kvm=True)


# ---- kvm_s390_handle_vsie ----------------------------------------------------------------------------

def get_vsie_page(kvm, vcpu, addr: int) -> VsiePage | None:
    """Mirrors ``get_vsie_page()``'s lookup: a new vsie page for ``addr``, or None when the same SCB
    address is in use by another vCPU ("double use of sie control block")."""
    pages = kvm.arch.vsie_pages
    if addr in pages:
        return None
    pages[addr] = VsiePage(addr, vcpu)
    return pages[addr]


def put_vsie_page(kvm, vsie_page: VsiePage) -> None:
    """Mirrors ``put_vsie_page()``: the page is free for the next SIE on any SCB."""
    kvm.arch.vsie_pages.pop(vsie_page.scb_gpa, None)


def vsie_enter(vcpu, scb_addr: int, scb: ScbFields) -> tuple[VsieResult, VsiePage | None]:
    """``kvm_s390_handle_vsie()`` up to ``vsie_run()``: the alignment check, ``get_vsie_page()``,
    ``pin_scb()``, (``shadow_scb()``), ``pin_blocks()``.  On failure it unwinds as the kernel does
    (``out_unshadow``: ``unshadow_scb()`` then ``unpin_scb()``; ``out_put``) and returns no page."""
    kvm = vcpu.kvm
    if scb_addr & 0x1FF:                                             # 512 byte alignment
        return VsieResult(VsieOutcome.PROGRAM, Pgm.SPECIFICATION), None
    vsie_page = get_vsie_page(kvm, vcpu, scb_addr)
    if vsie_page is None:
        return VsieResult(VsieOutcome.BUSY), None
    if pin_scb(vcpu, vsie_page, scb_addr):
        put_vsie_page(kvm, vsie_page)
        return VsieResult(VsieOutcome.PROGRAM, Pgm.ADDRESSING, errno.EINVAL), None
    if pin_blocks(vcpu, vsie_page, scb):
        unshadow_scb(vcpu, vsie_page)
        unpin_scb(vcpu, vsie_page, scb_addr)
        put_vsie_page(kvm, vsie_page)
        return VsieResult(VsieOutcome.VALIDITY, vsie_page.ipb >> 16, errno.EINVAL), None
    vsie_page.icptcode = scb.icptcode               # what guest 3 exits SIE with (do_vsie_run())
    return VsieResult(VsieOutcome.RAN, int(scb.icptcode)), vsie_page


def vsie_exit(vcpu, vsie_page: VsiePage) -> None:
    """``kvm_s390_handle_vsie()`` after ``vsie_run()``: ``unpin_blocks()``, ``unshadow_scb()``,
    ``unpin_scb()``, ``put_vsie_page()``."""
    unpin_blocks(vcpu, vsie_page)
    unshadow_scb(vcpu, vsie_page)
    unpin_scb(vcpu, vsie_page, vsie_page.scb_gpa)
    put_vsie_page(vcpu.kvm, vsie_page)


@kpath
def kvm_s390_handle_vsie(vcpu, scb_addr: int, scb: ScbFields) -> Steps:
    """Mirrors ``kvm_s390_handle_vsie()``: :func:`vsie_enter`, guest 3 in ``vsie_run()`` (the one
    preemption point, also on a failed entry, so an interleaving's order fits both versions: the blocks
    stay pinned while guest 3 runs), :func:`vsie_exit`.  Returns a :class:`VsieResult`."""
    res, vsie_page = vsie_enter(vcpu, scb_addr, scb)
    yield "kvm_s390_handle_vsie: pin_scb, pin_blocks done; vsie_run: guest 3 in SIE (sie64a)"
    if vsie_page is not None:
        vsie_exit(vcpu, vsie_page)
    return res


def vsie_page_of(kvm, scb_addr: int) -> VsiePage:
    """The vsie page in use for ``scb_addr`` (the split ``vsie_enter`` / ``vsie_exit`` steps)."""
    page = kvm.arch.vsie_pages.get(scb_addr)
    if page is None:
        raise ModelError(errno.EINVAL, f"no vSIE entered on the SCB at {scb_addr:#x}")
    return page
