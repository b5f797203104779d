"""The oracle kernels: where they are (``../shared/oracle`` beside the checkout, or
``KVMSIM_ORACLE_KERNELS``), their release (read from the bzImage header, arch/x86/boot/header.S
``kernel_version``) and the protocol each runs: legacy before v6.13, the series from v6.13
("KVM: Stop grabbing references to PFNMAP'd pages", merged for v6.13).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from kvmsim.errors import UsageError

ENV = "KVMSIM_ORACLE_KERNELS"
SERIES_FIRST = (6, 13)


@dataclass(frozen=True)
class OracleKernel:
    path: Path
    release: str

    @property
    def policy(self) -> str:
        return policy_for_release(self.release)


def parse_release(release: str) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        raise UsageError(f"cannot parse a kernel release from {release!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def policy_for_release(release: str) -> str:
    """``series`` for v6.13 and later, ``legacy`` before."""
    return "series" if parse_release(release)[:2] >= SERIES_FIRST else "legacy"


def bzimage_release(path: str | os.PathLike) -> str:
    """The release string a bzImage carries (setup header: ``kernel_version`` at 0x200 + 0x0e + 0x200)."""
    with open(path, "rb") as f:
        head = f.read(0x4000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise UsageError(f"{path} is not an x86 bzImage (no HdrS setup header)")
    (off,) = struct.unpack_from("<H", head, 0x20E)
    start = off + 0x200
    raw = head[start:start + 256].split(b"\0")[0].decode(errors="replace")
    return raw.split()[0] if raw else ""


def default_kernel_dir() -> Path:
    """``$KVMSIM_ORACLE_KERNELS``, else ``../shared/oracle`` relative to the checkout."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[4]          # src/kvmsim/backend/oracle → checkout
    return (checkout / ".." / "shared" / "oracle").resolve()


def find_kernels(paths: list[str] | None = None) -> list[OracleKernel]:
    """The kernels named (files), or every ``bzImage-*`` in the default directory, oldest first."""
    files: list[Path] = []
    if paths:
        for p in paths:
            if not Path(p).is_file():
                raise UsageError(f"kernel image {p} does not exist")
            files.append(Path(p))
    else:
        d = default_kernel_dir()
        if d.is_dir():
            files = sorted(d.glob("bzImage-*"))
    out = [OracleKernel(f, bzimage_release(f)) for f in files]
    return sorted(out, key=lambda k: parse_release(k.release))
