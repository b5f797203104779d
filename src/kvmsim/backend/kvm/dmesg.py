"""Watch the kernel log for KVM warnings (kernel/printk: the ``/dev/kmsg`` record format of
Documentation/ABI/testing/dev-kmsg).

``DmesgWatch()`` remembers the last record's sequence number; ``new_problems()`` returns the records
logged since then at KERN_WARNING or worse whose text names KVM (e.g. "KVM: debugfs: duplicate
directory", "kvm-pvm: triple fault ..."), and the WARN/BUG reports whose first line or call-trace
frames (the indented lines that follow) mention KVM (``kvm``, ``kvm_pvm``); the "Modules linked in"
line, which names kvm on every KVM host, is ignored.
The real-KVM tests assert that it is empty: kvmsim must never make the host kernel warn.  Reading
/dev/kmsg needs CAP_SYSLOG (or ``kernel.dmesg_restrict=0``); without it ``available`` is False.
"""

from __future__ import annotations

import errno
import os
import re

_PROBLEM = re.compile(r"WARNING:|BUG:|kernel BUG|Oops|general protection fault|"
                      r"UBSAN:|KASAN:|refcount_t:|list_(add|del) corruption")
_KVM = re.compile(r"kvm", re.IGNORECASE)
_CONTEXT = 40
KERN_WARNING = 4


def read_kmsg() -> list[tuple[int, str, int]]:
    """Every record currently in the ring buffer as ``(seq, text, level)``."""
    out = []
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten while reading; keep going
                    continue
                raise
            if not rec:
                break
            head, _, msg = rec.decode(errors="replace").partition(";")
            fields = head.split(",")
            seq = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else -1
            level = int(fields[0]) & 7 if fields[0].isdigit() else 6
            out.append((seq, msg.split("\n")[0], level))
    finally:
        os.close(fd)
    return out


class DmesgWatch:
    """A snapshot of the kernel log; ``new_problems()`` lists the KVM WARN/BUG lines since."""

    def __init__(self) -> None:
        try:
            records = read_kmsg()
            self.available = True
        except OSError:
            records = []
            self.available = False
        self.last_seq = records[-1][0] if records else -1

    def _new(self) -> list[tuple[str, int]]:
        if not self.available:
            return []
        return [(msg, level) for seq, msg, level in read_kmsg() if seq > self.last_seq]

    def new_lines(self) -> list[str]:
        return [msg for msg, _ in self._new()]

    def new_problems(self, kvm_only: bool = True) -> list[str]:
        new = self._new()
        lines = [msg for msg, _ in new]
        starts = [i for i, (line, level) in enumerate(new)
                  if not line.startswith(" ") and (_PROBLEM.search(line) or (
                      level <= KERN_WARNING and _KVM.search(line)))]
        problems = []
        for n, i in enumerate(starts):
            end = min(starts[n + 1] if n + 1 < len(starts) else len(lines), i + _CONTEXT)
            frames = [lines[i]] + [c for c in lines[i + 1:end] if c[:1].isspace()]
            if not kvm_only or any(_KVM.search(c) for c in frames):
                problems.append(lines[i])
        return problems
