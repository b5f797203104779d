"""Real kernels as the oracle: v6.12 and v6.13 with real stage-2 (NPT) faults, booted under QEMU/TCG.

The boot API (what other tools build on, e.g. running the kernel's own KVM selftests)::

    from kvmsim.backend.oracle import BootConfig, OracleError, boot

    res = boot("../shared/oracle/bzImage-6.13.7",       # a bzImage
               "/work/venv/bin/python -m my.module $OUT",  # /bin/sh command, chrooted in this machine's root
               "/tmp/results",                              # host directory = $OUT inside the guest
               env={"PYTHONPATH": "/path/to/src"},
               config=BootConfig(timeout=300, hugepages_2m=64, hugepages_1g=1))
    res.returncode   # the command's exit status (non-zero is not an error)
    res.log          # the serial console; res.command_log: the command's stdout+stderr
    res.results_dir  # what the command wrote to $OUT
    res.seconds, res.uptime   # wall time of the boot, guest uptime when the command ended

``boot`` raises :class:`OracleError` (a ``BackendError``) when qemu or the kernel is missing, the guest
panics, or the command does not finish in time; qemu is killed in every case.  Inside the guest the
host root is read-only (9p), ``/tmp`` is a tmpfs, ``/sys/kernel/tracing`` and ``/dev/hugepages`` are
mounted, and hugepage pools are reserved on the kernel command line.

Modules: ``boot`` (qemu command line, timeouts), ``initramfs`` (busybox + /init), ``kernels`` (finding
the shipped kernels and their protocol), ``agent`` (runs inside the guest: drives the real KVM through
kvmsim's client and records stats, kprobe hits, page flags and dmesg per phase), ``cases`` (the
hardware-mode conformance suite), ``model_side`` (the model in hardware mode, counters mapped to the
kernel functions), ``run`` (boot once per kernel, compare), ``setup`` (apt, Debian kernels, build-kernel).
"""

from kvmsim.backend.oracle.boot import BootConfig, BootResult, OracleError, boot, qemu_binary

__all__ = ["BootConfig", "BootResult", "OracleError", "boot", "qemu_binary"]
