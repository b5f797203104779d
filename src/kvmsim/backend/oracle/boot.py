"""Booting an oracle kernel under ``qemu-system-x86_64 -accel tcg -cpu max,-la57`` (TCG's AMD model with
SVM and NPT, so KVM inside the guest takes real NPT faults), with the initramfs of initramfs.py, the host
root read-only over 9p and a writable results share; the command line follows
``../shared/oracle/README.md`` exactly.

One boot runs one command (normally the in-guest agent over a whole batch of cases).  qemu is always
killed when the boot ends, however it ends (timeout, KeyboardInterrupt, an error here).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmsim.backend.oracle.initramfs import InitramfsSpec, build_initramfs
from kvmsim.errors import BackendError, UsageError

QEMU = "qemu-system-x86_64"


class OracleError(BackendError):
    """An oracle boot failed: qemu or the kernel missing, a guest panic, a timeout, no result."""


@dataclass
class BootConfig:
    """How to boot: memory, hugepages reserved on the guest kernel command line, timeout, extras."""

    memory_mb: int = 3072
    hugepages_2m: int = 64
    hugepages_1g: int = 1
    timeout: float = 600.0
    cpus: int = 1
    extra_append: str = ""
    modules: list[Path] = field(default_factory=list)


@dataclass
class BootResult:
    """What a boot gave back: the command's exit status (None if it never finished), the console log,
    the results directory, wall seconds and the guest uptime when the command ended."""

    returncode: int | None
    log: str
    results_dir: Path
    seconds: float
    uptime: float | None
    command_log: str = ""

    @property
    def panicked(self) -> bool:
        return "Kernel panic" in self.log


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def kernel_cmdline(cfg: BootConfig) -> str:
    """The guest kernel's command line: console, panic, THP on madvise, NPT on, hugepage pools."""
    parts = ["console=ttyS0", "panic=-1", "quiet", "transparent_hugepage=madvise",
             "kvm_amd.npt=1", "kvm_amd.nested=0"]
    if cfg.hugepages_2m:
        parts += ["hugepagesz=2M", f"hugepages={cfg.hugepages_2m}"]
    if cfg.hugepages_1g:
        parts += ["hugepagesz=1G", f"hugepages={cfg.hugepages_1g}"]
    if cfg.extra_append:
        parts.append(cfg.extra_append)
    return " ".join(parts)


def qemu_command(kernel: Path, initrd: Path, results_dir: Path, cfg: BootConfig) -> list[str]:
    """The qemu argv (../shared/oracle/README.md, "How they were booted")."""
    qemu = qemu_binary() or QEMU
    return [qemu, "-accel", "tcg", "-cpu", "max,-la57", "-m", f"{cfg.memory_mb}M", "-smp", str(cfg.cpus),
            "-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={results_dir},mount_tag=out,security_model=none,multidevs=remap",
            "-append", kernel_cmdline(cfg)]


def boot(kernel: str | os.PathLike, command: str, results_dir: str | os.PathLike, *,
         env: dict[str, str] | None = None, config: BootConfig | None = None) -> BootResult:
    """Boot ``kernel``, run ``command`` (a /bin/sh script line) chrooted in this machine's root with
    ``env`` and ``$OUT`` naming the results directory as the guest sees it, power off, return.

    Raises :class:`OracleError` when qemu or the kernel is missing, the guest panics, or the command
    does not finish within ``config.timeout`` seconds; a command that exits non-zero is *not* an error
    (``returncode`` says so)."""
    cfg = config or BootConfig()
    kernel = Path(kernel)
    results_dir = Path(results_dir).resolve()
    if qemu_binary() is None:
        raise OracleError(f"{QEMU} not found: install qemu-system-x86 (`kvmsim oracle setup`)")
    if not kernel.is_file():
        raise OracleError(f"kernel image {kernel} does not exist")
    if cfg.memory_mb < 1024 + 1024 * cfg.hugepages_1g + 2 * cfg.hugepages_2m:
        raise UsageError(f"{cfg.memory_mb} MiB of guest memory cannot hold the hugepage pools "
                         f"({cfg.hugepages_2m}x2M, {cfg.hugepages_1g}x1G) and a system")
    results_dir.mkdir(parents=True, exist_ok=True)
    for stale in (".exitcode", ".uptime", "cmd.log"):
        (results_dir / stale).unlink(missing_ok=True)
    image = build_initramfs(InitramfsSpec(command, dict(env or {}), list(cfg.modules)))
    with tempfile.TemporaryDirectory(prefix="kvmsim-oracle-") as tmp:
        initrd = Path(tmp) / "initramfs.cpio"
        initrd.write_bytes(image)
        argv = qemu_command(kernel, initrd, results_dir, cfg)
        t0 = time.monotonic()
        log, timed_out = _run_qemu(argv, cfg.timeout)
        seconds = time.monotonic() - t0
    rc_file = results_dir / ".exitcode"
    rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
    up_file = results_dir / ".uptime"
    uptime = float(up_file.read_text().strip()) if up_file.exists() else None
    cmd_log = (results_dir / "cmd.log").read_text(errors="replace") if (results_dir / "cmd.log").exists() else ""
    result = BootResult(rc, log, results_dir, seconds, uptime, cmd_log)
    if timed_out:
        raise OracleError(f"{kernel.name}: no result within {cfg.timeout:.0f} s (qemu killed); "
                          f"console tail:\n{_tail(log)}")
    if result.panicked:
        raise OracleError(f"{kernel.name}: the guest kernel panicked:\n{_panic_excerpt(log)}")
    if rc is None:
        raise OracleError(f"{kernel.name}: the guest powered off without running the command; "
                          f"console tail:\n{_tail(log)}")
    return result


def _run_qemu(argv: list[str], timeout: float) -> tuple[str, bool]:
    """Run qemu in its own process group; kill the group on timeout or any exception."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out.decode(errors="replace"), False
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, _ = proc.communicate()
        return out.decode(errors="replace"), True
    except BaseException:
        _kill(proc)
        proc.communicate()
        raise


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(log: str, n: int = 25) -> str:
    return "\n".join(log.splitlines()[-n:])


def _panic_excerpt(log: str) -> str:
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if re.search(r"Kernel panic|BUG:|Oops", line):
            return "\n".join(lines[max(0, i - 10): i + 15])
    return _tail(log)
