"""Scenario ops for s390's vSIE (:mod:`kvmsim.s390.vsie`): guest 2 executing SIE on an SCB.

* ``vsie_run``: the whole ``kvm_s390_handle_vsie()`` (pins, guest 3 runs, unpins), steppable: an
  ``interleave`` can run host work while guest 3 runs with the blocks pinned;
* ``vsie_enter`` / ``vsie_exit``: the same path split at ``vsie_run()``, so whole steps (a driver
  teardown, ``get_dirty_log``) can run while guest 3 is in SIE.

The SCB's fields are arguments: ``scb`` (its guest address), ``sca``, ``itdba``, ``gvrd``,
``riccbd``, ``sdnxo`` (each a guest address as guest 2 wrote it; leaving one out means the SCB does
not use that block) and ``icptcode`` (the intercept guest 3 exits with).  The result is ``ran``,
``program`` (a program interrupt for guest 2; ``value`` is its code, 0x05 PGM_ADDRESSING or 0x06
PGM_SPECIFICATION), ``validity`` (a validity intercept; ``value`` is the reason code) or ``busy`` (the
SCB is in use by another vCPU).  ``errno`` is ``pin_guest_page()``'s -EINVAL when a pin failed;
KVM_RUN itself returns 0 in every case.
"""

from __future__ import annotations

import errno

from kvmsim.errors import ModelError
from kvmsim.scenarios.env import Env, Res, _done
from kvmsim.scenarios.loader import REQUIRED, c_int, c_size

_SCB = {"scb": (c_size, REQUIRED), "sca": (c_size, None), "itdba": (c_size, None), "gvrd": (c_size, None),
        "riccbd": (c_size, None), "sdnxo": (c_size, None), "icptcode": (c_int, 4), "vcpu": (c_int, 0)}

S390_OP_ARGS = {
    "vsie_run": _SCB,
    "vsie_enter": _SCB,
    "vsie_exit": {"scb": (c_size, REQUIRED)},
}


def _s390(env: Env, op: str):
    from kvmsim.s390 import S390Gmap
    if not isinstance(env.kvm.arch, S390Gmap):
        raise ModelError(errno.EINVAL, f"{op} is s390's vSIE: it needs arch = \"s390\" in [vm]")


def _fields(a: dict):
    from kvmsim.s390.vsie import ScbFields
    return ScbFields(sca=a["sca"], itdba=a["itdba"], gvrd=a["gvrd"], riccbd=a["riccbd"], sdnxo=a["sdnxo"],
                     icptcode=a["icptcode"])


def _res(r) -> Res:
    return Res(r.outcome.name.lower(), r.errno, r.code or None)


def op_vsie_run(env: Env, a: dict):
    from kvmsim.s390.vsie import kvm_s390_handle_vsie
    _s390(env, "vsie_run")
    r = yield from kvm_s390_handle_vsie.steps(env.vcpu(a["vcpu"]), a["scb"], _fields(a))
    return _res(r)


def op_vsie_enter(env: Env, a: dict):
    from kvmsim.s390.vsie import vsie_enter
    _s390(env, "vsie_enter")
    r, _ = vsie_enter(env.vcpu(a["vcpu"]), a["scb"], _fields(a))
    yield from _done("kvm_s390_handle_vsie: pin_scb, pin_blocks done; guest 3 in SIE")
    return _res(r)


def op_vsie_exit(env: Env, a: dict):
    from kvmsim.s390.vsie import vsie_exit, vsie_page_of
    _s390(env, "vsie_exit")
    page = vsie_page_of(env.kvm, a["scb"])
    vsie_exit(page.vcpu, page)
    yield from _done("kvm_s390_handle_vsie: unpin_blocks, unshadow_scb, unpin_scb done")
    return Res("ok")


S390_OPS = {"vsie_run": op_vsie_run, "vsie_enter": op_vsie_enter, "vsie_exit": op_vsie_exit}
