"""``kvmsim oracle setup`` and ``kvmsim oracle build-kernel``: what the oracle needs on the host.

* ``ensure_packages()``: ``qemu-system-x86`` and ``busybox-static`` via apt-get when missing (root only).
* ``fetch_debian_kernel()``: Debian's packaged ``linux-image-6.12.*+deb12-amd64`` with ``apt-get download``,
  unpacked with ``dpkg -x`` (never installed); its ``vmlinuz`` becomes the oracle kernel and the modules
  the initramfs must load (kvm, kvm_amd, virtio_pci, 9pnet_virtio, 9p and their dependencies, from
  ``modules.dep``) are listed for ``BootConfig.modules``.  Packaged kernels lack ``page_idle``.
* ``build_kernel()``: an oracle kernel from any kernel tree: ``x86_64_defconfig`` +
  ``kernel/configs/kvm_guest.config`` + the shipped ``oracle.config`` fragment, ``olddefconfig``,
  ``bzImage`` (../shared/oracle/README.md; 5-7 minutes on 2 cores).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from kvmsim.backend.oracle.boot import OracleError
from kvmsim.errors import UsageError

PACKAGES = {"qemu-system-x86": "qemu-system-x86_64", "busybox-static": "busybox"}
DEBIAN_KERNEL_PATTERN = r"^linux-image-6\.12\.[0-9.-]+\+deb12-amd64(-unsigned)?$"
MODULES_NEEDED = ("kvm", "kvm-amd", "virtio_pci", "9pnet_virtio", "9p")
BUILD_PACKAGES = ("build-essential", "flex", "bison", "bc", "libelf-dev", "libssl-dev")


def oracle_config_fragment() -> str:
    """The shipped config fragment (a copy of ../shared/oracle/oracle.config)."""
    return resources.files("kvmsim.backend.oracle").joinpath("data/oracle.config").read_text()


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)
    except FileNotFoundError:
        raise OracleError(f"{argv[0]} not found") from None
    except subprocess.CalledProcessError as e:
        raise OracleError(f"{' '.join(argv)} failed ({e.returncode}): {(e.stderr or e.stdout)[-2000:]}") from None


def missing_packages() -> list[str]:
    return [pkg for pkg, binary in PACKAGES.items() if shutil.which(binary) is None]


def ensure_packages(log=print) -> list[str]:
    """Install the missing packages with apt-get (update first); returns what was installed."""
    missing = missing_packages()
    if not missing:
        return []
    if os.geteuid() != 0:
        raise OracleError(f"missing {', '.join(missing)}: installing needs root (apt-get install -y {' '.join(missing)})")
    if shutil.which("apt-get") is None:
        raise OracleError(f"missing {', '.join(missing)} and no apt-get here: install them by hand")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log("apt-get update")
    _run(["apt-get", "update", "-q"], env=env)
    log(f"apt-get install {' '.join(missing)}")
    _run(["apt-get", "install", "-y", "-q", *missing], env=env)
    still = missing_packages()
    if still:
        raise OracleError(f"apt-get install finished but {', '.join(still)} is still missing")
    return missing


@dataclass
class DebianKernel:
    package: str
    image: Path
    release: str
    modules: list[Path] = field(default_factory=list)


def debian_kernel_packages() -> list[str]:
    """The linux-image-6.12.*+deb12-amd64 package names apt knows (apt-cache search, one query)."""
    out = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.12\..*amd64"]).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if re.match(DEBIAN_KERNEL_PATTERN, n) and not n.endswith("-unsigned"))


def fetch_debian_kernel(dest: str | os.PathLike, package: str | None = None, log=print) -> DebianKernel:
    """``apt-get download`` the newest (or the named) package into ``dest`` and ``dpkg -x`` it there."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if package is None:
        pkgs = debian_kernel_packages()
        if not pkgs:
            raise OracleError("apt knows no linux-image-6.12.*+deb12-amd64 package (bookworm-backports enabled?)")
        package = pkgs[-1]
    log(f"apt-get download {package}")
    _run(["apt-get", "download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if not debs:
        raise OracleError(f"apt-get download {package} left no .deb in {dest}")
    root = dest / package
    _run(["dpkg", "-x", str(debs[-1]), str(root)])
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise OracleError(f"{debs[-1].name} has no /boot/vmlinuz-*")
    release = images[-1].name.removeprefix("vmlinuz-")
    return DebianKernel(package, images[-1], release, initramfs_modules(root / "lib" / "modules" / release))


def initramfs_modules(moddir: Path, wanted=MODULES_NEEDED) -> list[Path]:
    """The .ko files for ``wanted`` and their dependencies, in load order (from ``modules.dep``)."""
    dep_file = moddir / "modules.dep"
    if not dep_file.exists():
        raise OracleError(f"{dep_file} is missing")
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_file.read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        name = Path(mod).name.split(".ko")[0].replace("-", "_")
        by_name[name] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        for d in deps.get(mod, []):
            visit(d)
        if mod not in order:
            order.append(mod)

    for w in wanted:
        mod = by_name.get(w.replace("-", "_"))
        if mod is None:
            continue                                   # built in
        visit(mod)
    out = []
    for mod in order:
        p = moddir / mod
        if p.suffix in (".xz", ".zst", ".gz"):
            raise OracleError(f"{p.name} is compressed; busybox insmod needs plain .ko (decompress first)")
        out.append(p)
    return out


def build_kernel(src: str | os.PathLike, out: str | os.PathLike | None = None, *, jobs: int | None = None,
                 dry_run: bool = False, log=print) -> list[list[str]]:
    """Build ``arch/x86/boot/bzImage`` in the tree ``src`` with the oracle config; returns the commands
    (only returns them with ``dry_run``).  ``out`` gets a copy named ``bzImage-<release>``."""
    src = Path(src)
    if not (src / "Makefile").exists() or not (src / "arch" / "x86").is_dir():
        raise UsageError(f"{src} is not a Linux kernel tree (no Makefile / arch/x86)")
    frag = src / ".kvmsim-oracle.config"
    jobs = jobs or os.cpu_count() or 1
    cmds = [["make", "-C", str(src), "x86_64_defconfig"],
            ["make", "-C", str(src), "kvm_guest.config"],
            [str(src / "scripts" / "kconfig" / "merge_config.sh"), "-m", "-O", str(src), str(src / ".config"),
             str(frag)],
            ["make", "-C", str(src), "olddefconfig"],
            ["make", "-C", str(src), f"-j{jobs}", "bzImage"]]
    if dry_run:
        return cmds
    frag.write_text(oracle_config_fragment())
    for c in cmds:
        log(" ".join(c))
        _run(c)
    image = src / "arch" / "x86" / "boot" / "bzImage"
    if out is not None:
        from kvmsim.backend.oracle.kernels import bzimage_release
        dest = Path(out) / f"bzImage-{bzimage_release(image)}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(image, dest)
        log(f"wrote {dest}")
    return cmds
