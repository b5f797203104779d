"""The boot layer without booting: the initramfs image, the qemu command line, the errors."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

import kvmsim.backend.oracle.boot  # noqa: F401 - the module, not the function the package exports
from kvmsim.backend.oracle.boot import BootConfig, OracleError, boot, kernel_cmdline, qemu_command
from kvmsim.backend.oracle.initramfs import InitramfsSpec, build_initramfs
from kvmsim.backend.oracle.kernels import (bzimage_release, default_kernel_dir, find_kernels,
                                           policy_for_release)
from kvmsim.errors import UsageError

boot_mod = sys.modules["kvmsim.backend.oracle.boot"]


def parse_newc(image: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name → (mode, data, (rdevmajor, rdevminor)) of a newc archive."""
    out, off = {}, 0
    while True:
        assert image[off:off + 6] == b"070701", f"bad magic at {off}"
        f = [int(image[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = image[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        data = image[off: off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], data, (f[9], f[10]))


@pytest.fixture
def fake_busybox(tmp_path) -> Path:
    p = tmp_path / "busybox"
    p.write_bytes(b"\x7fELF fake busybox")
    return p


def test_initramfs_has_init_busybox_console_and_the_command(fake_busybox):
    image = build_initramfs(InitramfsSpec("echo hi > $OUT/x", {"PYTHONPATH": "/a b/src"}, busybox=fake_busybox))
    files = parse_newc(image)
    mode, init, _ = files["init"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert b"hostroot /host" in init and b"out /host/tmp/oracle-out" in init
    assert b"mount -t tracefs" in init and b"poweroff -f" in init and b"chroot /host" in init
    assert files["bin/busybox"][1] == fake_busybox.read_bytes()
    mode, _, rdev = files["dev/console"]
    assert stat.S_ISCHR(mode) and rdev == (5, 1)
    cmd = files["cmd"][1].decode()
    assert "export PYTHONPATH='/a b/src'" in cmd and cmd.rstrip().endswith("echo hi > $OUT/x")
    assert len(image) % 512 == 0


def test_initramfs_modules_load_in_order(tmp_path, fake_busybox):
    mods = []
    for name in ("kvm.ko", "kvm-amd.ko"):
        (tmp_path / name).write_bytes(name.encode())
        mods.append(tmp_path / name)
    files = parse_newc(build_initramfs(InitramfsSpec("true", modules=mods, busybox=fake_busybox)))
    assert files["modules.order"][1].decode().split() == ["kvm.ko", "kvm-amd.ko"]
    assert files["lib/modules/kvm-amd.ko"][1] == b"kvm-amd.ko"


def test_initramfs_without_busybox_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="busybox"):
        build_initramfs(InitramfsSpec("true", busybox=tmp_path / "missing"))


def test_qemu_command_line_is_the_readme_one(tmp_path):
    cfg = BootConfig(memory_mb=3072, hugepages_2m=64, hugepages_1g=1)
    argv = qemu_command(Path("/k/bzImage"), Path("/i.cpio"), tmp_path, cfg)
    joined = " ".join(argv)
    for part in ("-accel tcg", "-cpu max,-la57", "-m 3072M", "-nographic", "-no-reboot", "-kernel /k/bzImage",
                 "-initrd /i.cpio",
                 "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
                 f"local,path={tmp_path},mount_tag=out,security_model=none,multidevs=remap"):
        assert part in joined
    append = argv[argv.index("-append") + 1]
    assert append == kernel_cmdline(cfg)
    for part in ("console=ttyS0", "panic=-1", "transparent_hugepage=madvise", "kvm_amd.npt=1",
                 "hugepagesz=2M hugepages=64", "hugepagesz=1G hugepages=1"):
        assert part in append


def test_boot_errors_are_clean(tmp_path, monkeypatch):
    monkeypatch.setattr(boot_mod, "qemu_binary", lambda: None)
    with pytest.raises(OracleError, match="qemu-system-x86_64 not found"):
        boot(tmp_path / "k", "true", tmp_path / "out")
    monkeypatch.setattr(boot_mod, "qemu_binary", lambda: "/bin/true")
    with pytest.raises(OracleError, match="does not exist"):
        boot(tmp_path / "no-such-kernel", "true", tmp_path / "out")
    (tmp_path / "k").write_bytes(b"x")
    with pytest.raises(UsageError, match="hugepage pools"):
        boot(tmp_path / "k", "true", tmp_path / "out", config=BootConfig(memory_mb=1024))


def _fake_qemu(tmp_path, body: str) -> str:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!{sys.executable}\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_timeout_kills_qemu_and_says_so(tmp_path, monkeypatch, fake_busybox):
    pidfile = tmp_path / "pid"
    fake = _fake_qemu(tmp_path, f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                                "print('booting', flush=True)\ntime.sleep(60)")
    monkeypatch.setattr(boot_mod, "qemu_binary", lambda: fake)
    monkeypatch.setattr("kvmsim.backend.oracle.initramfs.find_busybox", lambda: fake_busybox)
    (tmp_path / "k").write_bytes(b"x")
    with pytest.raises(OracleError, match="no result within"):
        boot(tmp_path / "k", "true", tmp_path / "out", config=BootConfig(timeout=1.5))
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_panic_and_missing_result_are_errors(tmp_path, monkeypatch, fake_busybox):
    monkeypatch.setattr("kvmsim.backend.oracle.initramfs.find_busybox", lambda: fake_busybox)
    (tmp_path / "k").write_bytes(b"x")
    fake = _fake_qemu(tmp_path, "print('Kernel panic - not syncing: VFS: Unable to mount root fs')")
    monkeypatch.setattr(boot_mod, "qemu_binary", lambda: fake)
    with pytest.raises(OracleError, match="panicked"):
        boot(tmp_path / "k", "true", tmp_path / "out")
    fake = _fake_qemu(tmp_path, "print('reboot: Power down')")
    monkeypatch.setattr(boot_mod, "qemu_binary", lambda: fake)
    with pytest.raises(OracleError, match="without running the command"):
        boot(tmp_path / "k", "true", tmp_path / "out")


def test_a_command_exit_status_comes_back(tmp_path, monkeypatch, fake_busybox):
    monkeypatch.setattr("kvmsim.backend.oracle.initramfs.find_busybox", lambda: fake_busybox)
    (tmp_path / "k").write_bytes(b"x")
    out = tmp_path / "out"
    fake = _fake_qemu(tmp_path, f"import pathlib\np = pathlib.Path({str(out)!r})\n"
                                "(p / '.exitcode').write_text('3\\n'); (p / '.uptime').write_text('2.5\\n')\n"
                                "(p / 'cmd.log').write_text('hello\\n')")
    monkeypatch.setattr(boot_mod, "qemu_binary", lambda: fake)
    r = boot(tmp_path / "k", "false", out)
    assert (r.returncode, r.uptime, r.command_log) == (3, 2.5, "hello\n")


@pytest.mark.parametrize("release, policy", [("6.12.0", "legacy"), ("6.12.117", "legacy"),
                                             ("6.13.7", "series"), ("6.14.0-rc1", "series"), ("5.15.0", "legacy")])
def test_policy_for_release(release, policy):
    assert policy_for_release(release) == policy


def test_bzimage_release_of_the_shipped_kernels():
    kernels = find_kernels()
    if not kernels:
        pytest.skip(f"no oracle kernels in {default_kernel_dir()}")
    for k in kernels:
        assert k.path.name == f"bzImage-{k.release}"


def test_bzimage_release_refuses_a_non_bzimage(tmp_path):
    p = tmp_path / "bzImage-x"
    p.write_bytes(b"\0" * 0x1000)
    with pytest.raises(UsageError, match="not an x86 bzImage"):
        bzimage_release(p)


def test_kernel_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMSIM_ORACLE_KERNELS", str(tmp_path))
    assert default_kernel_dir() == tmp_path
    assert find_kernels() == []
