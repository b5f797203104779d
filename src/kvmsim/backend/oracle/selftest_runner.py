"""Runs inside an oracle guest: the kernel's own KVM selftests (tools/testing/selftests/kvm/), one after
another, with kprobe hit counts (kernel/trace/trace_kprobe.c ``kprobe_profile``) and the KVM stats
(virt/kvm/kvm_main.c ``kvm_init_debug()``: ``/sys/kernel/debug/kvm/<stat>``, summed over every VM)
snapshotted at each phase line the selftest prints.

Splitting counts per phase from outside the selftest: the runner reads the selftest's stdout (the
selftests make stdout unbuffered, ``kvm_selftest_init()`` in lib/kvm_util.c: one ``write()`` per
``pr_info()``) and runs as ``SCHED_FIFO`` on the guest's single CPU.  A real-time task woken by the
pipe write preempts the selftest before it returns to user space (both are pinned to one CPU when the
guest has more), so the snapshot is taken before the selftest can start the next phase: a phase's counts are exactly what happened between two printed
lines.  The segment after the last phase line up to the selftest's exit is ``teardown`` (joining
the vCPU threads and destroying the VM).

Usage (inside the guest): ``python -m kvmsim.backend.oracle.selftest_runner SPEC.json OUT.json``;
SPEC is ``{"probes": [fn, ...], "runs": [{"name", "argv", "phase_re", "timeout", "setup", "drop_caps"}]}``.
Standard library only: it runs with whatever Python the host root has.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

TRACING = "/sys/kernel/tracing"
KVM_DEBUGFS = "/sys/kernel/debug/kvm"
GROUP = "kvmsim_st"
STATS = ("pages_4k", "pages_2m", "pages_1g", "pf_taken", "pf_fixed", "pf_fast", "pf_spurious",
         "pf_emulate", "remote_tlb_flush", "tlb_flush", "nx_lpage_splits", "exits")


def _write(path: str, text: str, append: bool = False) -> None:
    # os-level writes: buffered append mode seeks to the end, which tracefs refuses
    fd = os.open(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC))
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


CAPS = {"CAP_SYS_BOOT": 22}           # include/uapi/linux/capability.h
PR_CAPBSET_DROP = 24


def _drop_caps(caps) -> None:
    """In the child before exec: drop ``caps`` from the bounding set, so root's exec does not get them
    (kernel/capability.c: a root exec's permitted set is the bounding set)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for c in caps:
        if libc.prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {c})")


def setup_probes(functions) -> tuple[dict[str, str], dict[str, str]]:
    """A kprobe event per function, enabled; returns (present fn -> event, absent fn -> reason)."""
    present, absent = {}, {}
    try:
        _write(f"{TRACING}/events/{GROUP}/enable", "0\n")
    except OSError:
        pass
    for line in open(f"{TRACING}/kprobe_events").read().splitlines():
        if line.startswith(f"p:{GROUP}/"):
            _write(f"{TRACING}/kprobe_events", f"-:{line.split()[0][2:]}\n", append=True)
    for fn in functions:
        ev = re.sub(r"[^A-Za-z0-9_]", "_", fn)
        try:
            _write(f"{TRACING}/kprobe_events", f"p:{GROUP}/{ev} {fn}\n", append=True)
            _write(f"{TRACING}/events/{GROUP}/{ev}/enable", "1\n")
        except OSError as e:
            absent[fn] = os.strerror(e.errno or 0)
            continue
        present[fn] = ev
    return present, absent


def snapshot(present: dict[str, str]) -> dict[str, int]:
    """Hits so far per probed function, plus the KVM debugfs stats (absent stats are left out)."""
    hits = {}
    if present:
        for line in open(f"{TRACING}/kprobe_profile").read().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                hits[parts[0].split("/", 1)[-1]] = int(parts[1])
    out = {fn: hits.get(ev, 0) for fn, ev in present.items()}
    for s in STATS:
        try:
            with open(f"{KVM_DEBUGFS}/{s}") as f:
                out[f"stat.{s}"] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def run_one(run: dict, present: dict[str, str]) -> dict:
    """Run one selftest; split counts at every stdout line matching ``run["phase_re"]``."""
    phase_re = re.compile(run["phase_re"]) if run.get("phase_re") else None
    for cmd in run.get("setup", []):
        subprocess.run(cmd, shell=True, check=False)
    snaps = [{"line": None, "t": 0.0, "counts": snapshot(present)}]
    cpus = os.sched_getaffinity(0)
    if phase_re is not None and len(cpus) > 1:
        os.sched_setaffinity(0, {min(cpus)})       # the selftest inherits it: one CPU for both
    t0 = time.monotonic()
    drop = [CAPS[c] for c in run.get("drop_caps", [])]
    proc = subprocess.Popen(run["argv"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=(lambda: _drop_caps(drop)) if drop else None)
    timed_out = threading.Event()

    def _expire() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(float(run.get("timeout", 120)), _expire)
    timer.start()
    rt = False
    if phase_re is not None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
            rt = True
        except (OSError, AttributeError):
            pass
    out, pending = [], b""
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                out.append(line)
                if phase_re is not None and phase_re.search(line):
                    snaps.append({"line": line, "t": time.monotonic() - t0, "counts": snapshot(present)})
        if pending:
            out.append(pending.decode(errors="replace"))
        rc = proc.wait()
    finally:
        timer.cancel()
        if rt:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        os.sched_setaffinity(0, cpus)
    snaps.append({"line": None, "t": time.monotonic() - t0, "counts": snapshot(present)})
    return {"name": run["name"], "argv": run["argv"], "returncode": rc, "timed_out": timed_out.is_set(),
            "seconds": time.monotonic() - t0, "output": out, "snapshots": snaps, "realtime": rt}


KVM_CREATE_VM, KVM_CREATE_IRQCHIP, KVM_CREATE_VCPU = 0xAE01, 0xAE60, 0xAE41   # include/uapi/linux/kvm.h


def hold_vm() -> list[int]:
    """Create a VM with an in-kernel irqchip and one vCPU and keep it for the whole boot.

    KVM flips static keys whose count goes 0 <-> 1 as VMs and vCPUs come and go (``preempt_notifier_inc()``
    in kvm_create_vm(), the lapic's ``apic_sw_disabled``/``apic_hw_disabled``), and every flip patches
    kernel text (``text_poke_bp()``: an int3, then the new instruction).  Under TCG with two vCPUs a CPU
    can run the stale int3 after the patch is done ("Oops: int3" in ``__schedule()`` /
    ``finish_task_switch()``, seen in 2 of 3 two-CPU boots); with this VM held the counts never
    return to 0 and the selftests' own VMs patch nothing."""
    import fcntl
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    return [kvm, vm, vcpu]


def main(argv: list[str]) -> int:
    spec_path, out_path = argv[1], argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    held = hold_vm() if spec.get("hold_vm") else []     # noqa: F841 (kept open until exit)
    present, absent = setup_probes(spec.get("probes", []))
    with open("/proc/sys/kernel/osrelease") as f:
        release = f.read().strip()
    results = {"release": release, "absent": absent, "probes": sorted(present), "runs": []}
    for run in spec["runs"]:
        results["runs"].append(run_one(run, present))
        tmp = out_path + ".part"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, out_path)
        r = results["runs"][-1]
        print(f"selftest-runner: {r['name']} rc={r['returncode']} {r['seconds']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
