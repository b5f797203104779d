"""Host memory settings a test may need (Documentation/admin-guide/mm/hugetlbpage.rst ``nr_hugepages``,
Documentation/admin-guide/mm/transhuge.rst ``enabled``/``shmem_enabled``), changed only on request.

kvmsim never writes these files on its own.  :func:`host_settings` is the only writer: it records every
value it is about to change, applies the request, and restores the recorded values on exit, whatever
ends the block (an exception, Ctrl-C).  Mappings that use hugepages must be released inside the block,
or the restored pool shrinks only when they go away (surplus pages).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kvmsim.backend.kvm.caps import selected
from kvmsim.errors import BackendError, UsageError

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
THP_SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"

_FILES = {"nr_hugepages": NR_HUGEPAGES, "thp_enabled": THP_ENABLED, "thp_shmem_enabled": THP_SHMEM_ENABLED}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def read_host_settings() -> dict[str, str | None]:
    """The current value of every setting kvmsim knows (``None`` where the file is absent)."""
    out: dict[str, str | None] = {}
    for name, path in _FILES.items():
        try:
            raw = _read(path)
        except OSError:
            out[name] = None
            continue
        out[name] = raw if name == "nr_hugepages" else selected(raw)
    return out


@contextlib.contextmanager
def host_settings(*, nr_hugepages: int | None = None, thp_enabled: str | None = None,
                  thp_shmem_enabled: str | None = None) -> Iterator[dict[str, str | None]]:
    """Apply the requested settings for the duration of the block, then restore the old values.

    Yields the settings in effect inside the block.  Raises ``BackendError`` when a setting cannot
    be written (not root, file absent); anything already changed is restored first.
    """
    wanted = {"nr_hugepages": None if nr_hugepages is None else str(int(nr_hugepages)),
              "thp_enabled": thp_enabled, "thp_shmem_enabled": thp_shmem_enabled}
    if nr_hugepages is not None and nr_hugepages < 0:
        raise UsageError(f"nr_hugepages must be >= 0, got {nr_hugepages}")
    before = read_host_settings()
    changed: list[tuple[str, str]] = []
    try:
        for name, value in wanted.items():
            if value is None or before.get(name) == value:
                continue
            if before.get(name) is None:
                raise BackendError(f"{_FILES[name]} does not exist on this host")
            try:
                changed.append((name, before[name]))          # restore even a partial write
                _write(_FILES[name], value)
            except OSError as e:
                raise BackendError(f"cannot set {_FILES[name]} to {value}: {e.strerror}") from None
        yield read_host_settings()
    finally:
        errors = []
        for name, old in reversed(changed):
            try:
                _write(_FILES[name], old)
            except OSError as e:
                errors.append(f"{_FILES[name]} <- {old}: {e.strerror}")
        if errors:
            raise BackendError("could not restore host settings: " + "; ".join(errors))
