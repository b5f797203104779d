"""The exception tree of kvmsim.

::

    KvmsimError                      root: every error kvmsim raises on purpose
    ├── ModelError                   the modelled kernel refused an operation; carries ``errno``
    │   └── KvmBug                   a KVM_BUG_ON / WARN the model treats as fatal
    ├── UsageError                   bad input from the user (CLI arguments, builder API misuse)
    │   └── ScenarioError            a scenario file is malformed; carries file, line and key
    ├── BackendError                 the real /dev/kvm backend could not do what was asked
    │   ├── BackendUnavailable       no usable /dev/kvm (absent, no permission, disabled by env)
    │   └── KvmIoctlError            an ioctl failed; carries the ioctl name and errno
    └── ExploreError                 the interleaving explorer was misused (bad schedule, ...)

Errors from the model mirror the kernel's errno where the kernel has one, so a model result and a
real ``/dev/kvm`` result compare directly.
"""

from __future__ import annotations

import errno as _errno
import os


class KvmsimError(Exception):
    """Root of every error kvmsim raises on purpose."""


class ModelError(KvmsimError):
    """The modelled kernel refused an operation, with the errno the kernel returns."""

    def __init__(self, err: int, what: str):
        self.errno = err
        self.what = what
        super().__init__(f"{what}: {errno_name(err)} ({os.strerror(err)})")


class KvmBug(ModelError):
    """A ``KVM_BUG_ON``/``WARN_ON_ONCE`` that the model refuses to continue past."""

    def __init__(self, what: str):
        super().__init__(_errno.EIO, what)


class UsageError(KvmsimError):
    """Bad input from the user."""


class ScenarioError(UsageError):
    """A scenario file or builder call is malformed."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None):
        self.file = file
        self.line = line
        self.key = key
        self.message = message
        where = ""
        if file:
            where = file + (f":{line}" if line else "") + ": "
        if key:
            where += f"[{key}] "
        super().__init__(where + message)


class BackendError(KvmsimError):
    """The real-KVM backend failed."""


class BackendUnavailable(BackendError):
    """No usable /dev/kvm here; the message says why."""


class KvmIoctlError(BackendError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""

    def __init__(self, ioctl: str, err: int, detail: str = ""):
        self.ioctl = ioctl
        self.errno = err
        msg = f"{ioctl} failed: {errno_name(err)} ({os.strerror(err)})"
        super().__init__(msg + (f": {detail}" if detail else ""))


class ExploreError(KvmsimError):
    """The interleaving explorer was given something it cannot run."""


# include/uapi/asm-generic/errno.h: ``#define EHWPOISON 133 /* Memory page has hardware error */``.
# Python's errno module has no EHWPOISON; every other errno in kvmsim comes from ``errno``.
EHWPOISON = 133


def errno_name(err: int) -> str:
    """``errno.errorcode`` with a fallback, e.g. ``errno_name(14) == "EFAULT"``."""
    if err == EHWPOISON:
        return "EHWPOISON"
    return _errno.errorcode.get(err, str(err))
