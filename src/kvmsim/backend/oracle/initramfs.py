"""The oracle's initramfs: busybox plus an ``/init`` (a cpio "newc" archive, as
usr/gen_init_cpio.c writes and init/initramfs.c unpacks; written here in Python, no cpio tool).

``/init`` mounts proc, sysfs and devtmpfs, loads the modules a packaged kernel needs (none for the
shipped oracle kernels, which have everything built in), mounts this machine's root read-only over 9p
(``mount_tag hostroot``) at ``/host``, gives it a tmpfs ``/tmp``, its own proc/sys/dev, tracefs and
hugetlbfs, mounts the writable results share (``mount_tag out``) at ``/host/tmp/oracle-out``, runs
``/cmd`` chrooted in ``/host`` and powers off.  The command's exit status is written to
``.exitcode`` in the results share; its output goes to ``cmd.log`` there and to the console.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kvmsim.errors import UsageError

OUT_IN_GUEST = "/tmp/oracle-out"          # where the results share appears inside the chroot
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order 2>/dev/null); do insmod /lib/modules/$m || echo "oracle-init: insmod $m failed"; done
mkdir -p /host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro hostroot /host; then
    echo "oracle-init: cannot mount the host root over 9p (mount_tag hostroot)"; poweroff -f
fi
mount -t tmpfs tmpfs /host/tmp
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mount -t tracefs tracefs /host/sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null
mkdir -p /host/dev/shm /host/dev/hugepages
mount -t tmpfs tmpfs /host/dev/shm
mount -t hugetlbfs hugetlbfs /host/dev/hugepages 2>/dev/null
mkdir -p /host@OUT@
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /host@OUT@; then
    echo "oracle-init: cannot mount the results share (mount_tag out)"; poweroff -f
fi
echo "oracle-init: uptime $(cut -d' ' -f1 /proc/uptime) running /cmd"
cp /cmd /host/tmp/oracle-cmd
chroot /host /bin/sh /tmp/oracle-cmd > /host@OUT@/cmd.log 2>&1
rc=$?
echo $rc > /host@OUT@/.exitcode
cut -d' ' -f1 /proc/uptime > /host@OUT@/.uptime
sync
echo "oracle-init: command exited $rc"
poweroff -f
"""


@dataclass
class InitramfsSpec:
    """What goes into one initramfs: the command (a ``/bin/sh`` script run chrooted in the host root,
    with ``env``) and the kernel modules to ``insmod`` in order (packaged kernels only)."""

    command: str
    env: dict[str, str] = field(default_factory=dict)
    modules: list[Path] = field(default_factory=list)
    busybox: Path | None = None


def find_busybox() -> Path | None:
    """A statically linked busybox (Debian's ``busybox-static`` installs /bin/busybox)."""
    for p in BUSYBOX_CANDIDATES:
        if os.path.exists(p):
            return Path(p)
    found = shutil.which("busybox")
    return Path(found) if found else None


class _Cpio:
    """A newc writer: ``070701`` headers, names and data padded to 4 bytes, ``TRAILER!!!`` last."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(nb)
        self.buf.write(b"\0" * (-(110 + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def build_initramfs(spec: InitramfsSpec) -> bytes:
    """The initramfs image (uncompressed newc cpio) for ``spec``."""
    busybox = spec.busybox or find_busybox()
    if busybox is None or not Path(busybox).exists():
        raise UsageError("busybox not found: install busybox-static (`kvmsim oracle setup`)")
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "host", "lib", "lib/modules", "tmp"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    c.file("init", INIT.replace("@OUT@", OUT_IN_GUEST).encode(), 0o755)
    order = []
    for m in spec.modules:
        c.file(f"lib/modules/{m.name}", Path(m).read_bytes())
        order.append(m.name)
    c.file("modules.order", ("\n".join(order) + "\n").encode())
    env = "".join(f"export {k}={_shell_quote(v)}\n" for k, v in sorted(spec.env.items()))
    script = f"cd /\nexport OUT={OUT_IN_GUEST}\n{env}{spec.command}\n"
    c.file("cmd", script.encode(), 0o755)
    return c.finish()
