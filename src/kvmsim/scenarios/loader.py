"""Scenario files: TOML (stdlib ``tomllib``) → :class:`kvmsim.scenarios.spec.Scenario`.

Every key is checked; an unknown key, a missing one or a value of the wrong shape raises
:class:`kvmsim.errors.ScenarioError` naming the file, the line, the key and what was expected.
``tomllib`` reports no positions, so :class:`SourceLines` finds them by scanning the source text
for the table header and the key.  The file format is documented in the README ("Writing a
scenario file") and by the bundled library (``kvmsim show NAME``).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmsim.errors import ScenarioError
from kvmsim.kvm.arch import ARCH_NAMES
from kvmsim.mm.page import PfnClass
from kvmsim.mm.vma import VmaKind
from kvmsim.scenarios.spec import (
    POLICY_ALIASES,
    DriverSpec,
    FinalExpect,
    GuestMemfdSpec,
    HostSpec,
    Scenario,
    SlotSpec,
    Step,
    VmaSpec,
    VmSpec,
)
from kvmsim.scenarios.validate import (
    c_counters,
    c_errno,
    c_exit,
    c_result,
    c_violations,
    check_final,
    check_steps,
)
from kvmsim.types import parse_size
from kvmsim.uapi import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY

POLICIES = ("legacy", "series", "pre-5.13", "series-rc1", "series-only", "current")
REQUIRED = object()
MEM_FLAGS = {"log_dirty_pages": KVM_MEM_LOG_DIRTY_PAGES, "readonly": KVM_MEM_READONLY}  # the names a scenario may use
#: What a ``requires`` entry may name (``runner.missing_requirement`` says whether it is there).
REQUIREMENTS = ("x86_mmu",)
#: Largest scenario file read (bytes); the bundled ones are under 4 KiB.
MAX_FILE_BYTES = 1 << 20


# ---- positions in the source --------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


class SourceLines:
    """Line numbers of tables and keys, found by scanning the TOML text."""

    def __init__(self, text: str | None):
        self.lines = text.splitlines() if text else []
        self.headers: list[tuple[int, str]] = []           # (1-based line, dotted header)
        for n, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if m and not line.lstrip().startswith("#"):
                self.headers.append((n, m.group(2).replace(" ", "").replace('"', "")))

    def section(self, header: str, index: int | None = None) -> tuple[int, int] | None:
        """The line span ``[start, end)`` of table ``header`` (the ``index``-th for arrays of tables)."""
        hits = [i for i, (_, h) in enumerate(self.headers) if h == header]
        if not hits:
            return None
        k = hits[index or 0] if index is not None and index < len(hits) else hits[0] if index is None else None
        if k is None:
            return None
        start = self.headers[k][0]
        end = len(self.lines) + 1
        for n, h in self.headers[k + 1:]:
            if not h.startswith(header + "."):
                end = n
                break
        return start, end

    def find(self, path: tuple) -> int | None:
        """Best line for ``path`` (e.g. ``("step", 3, "expect", "exit")``)."""
        if not self.lines:
            return None
        header = ""
        index = None
        rest: list = []
        parts = list(path)
        while parts:
            p = parts.pop(0)
            if isinstance(p, int):
                index = p
                rest = parts
                break
            cand = f"{header}.{p}" if header else str(p)
            if any(h == cand or h.startswith(cand + ".") for _, h in self.headers):
                header = cand
            else:
                rest = [p] + parts
                break
        span = self.section(header, index) if header else (1, len(self.lines) + 1)
        if span is None:
            return None
        start, end = span
        best = start if header else None
        for key in rest:
            if isinstance(key, int):
                continue
            pat = re.compile(r"(^|[{,.\s\"])" + re.escape(str(key)) + r"\"?\s*[=.]")
            for n in range(best or start, end):
                line = self.lines[n - 1]
                if pat.search(line.split("#", 1)[0]):
                    best = n
                    break
        return best


class _Ctx:
    def __init__(self, file: str, text: str | None):
        self.file = file
        self.src = SourceLines(text)

    def error(self, path: tuple, message: str) -> ScenarioError:
        key = ".".join(str(p) if not isinstance(p, int) else f"#{p + 1}" for p in path).replace(".#", "#")
        return ScenarioError(message, file=self.file, line=self.src.find(path), key=key or None)


# ---- value converters ------------------------------------------------------------------------------

def c_size(v: Any) -> int:
    return parse_size(v)


def c_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")  # noqa: TRY004
    return v


def c_bounded(conv: Callable[[Any], int], lo: int, hi: int, what: str) -> Callable[[Any], int]:
    """``conv`` then a range check: the model allocates per page, so sizes and counts are capped."""
    def check(v: Any) -> int:
        n = conv(v)
        if not lo <= n <= hi:
            raise ValueError(f"expected {what} between {lo:#x} and {hi:#x}, got {n:#x}")
        return n
    return check


MAX_BYTES = 16 << 30                  # per VMA / memslot: 4 Mi pages
MAX_COUNT = 1 << 20                   # pages touched by one step


def c_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")  # noqa: TRY004
    return v


def c_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")  # noqa: TRY004
    return v


def c_choice(*choices: str) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        if not isinstance(v, str) or v.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
        return v.lower()
    return conv


def c_strlist(v: Any) -> list[str]:
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"expected a list of strings, got {v!r}")
    return list(v)


def c_any(v: Any) -> Any:
    return v


def _table(ctx: _Ctx, path: tuple, value: Any, schema: dict[str, tuple[Callable, Any]]) -> dict[str, Any]:
    """Check ``value`` is a table with only ``schema``'s keys; convert each; fill defaults."""
    if not isinstance(value, dict):
        raise ctx.error(path, f"expected a table, got {type(value).__name__} {value!r}")
    for k in value:
        if k not in schema:
            raise ctx.error(path + (k,), f"unknown key {k!r}; expected one of: {', '.join(schema)}")
    out = {}
    for k, (conv, default) in schema.items():
        if k in value:
            try:
                out[k] = conv(value[k])
            except ValueError as e:
                raise ctx.error(path + (k,), str(e)) from None
        elif default is REQUIRED:
            raise ctx.error(path, f"missing required key {k!r}")
        else:
            out[k] = default
    return out


def _array(ctx: _Ctx, path: tuple, value: Any) -> list:
    if not isinstance(value, list):
        raise ctx.error(path, f"expected an array of tables ([[{path[-1]}]]), got {value!r}")
    return value


def c_requires(v: Any) -> list[str]:
    names = c_strlist(v)
    for n in names:
        if n not in REQUIREMENTS:
            raise ValueError(f"unknown requirement {n!r}; expected one of: {', '.join(REQUIREMENTS)}")
    return names


def c_patches(v: Any) -> tuple[int, ...]:
    """``patches = [N, ...]``: the series patches (1..85, kvmsim.patches) whose difference this scenario shows."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in v):
        raise ValueError(f"expected a list of patch numbers, got {v!r}")
    for n in v:
        if not 1 <= n <= 85:
            raise ValueError(f"expected patch numbers 1..85 (the series' patches, `kvmsim patches`), got {n}")
    if len(set(v)) != len(v):
        raise ValueError(f"a patch is listed twice: {v!r}")
    return tuple(v)


# ---- sections -------------------------------------------------------------------------------------

TOP = {"name": (c_str, REQUIRED), "description": (c_str, ""), "source": (c_str, ""),
       "patches": (c_patches, ()), "requires": (c_requires, []), "host": (c_any, {}), "driver": (c_any, []),
       "vma": (c_any, []), "vm": (c_any, {}), "memslot": (c_any, []), "guest_memfd": (c_any, []), "step": (c_any, []),
       "expect": (c_any, {})}

DRIVER = {"name": (c_str, REQUIRED),
          "pfn_class": (c_choice(*(c.name.lower() for c in PfnClass)), REQUIRED),
          "size": (c_bounded(c_size, 4096, 1 << 30, "a driver size"), None),
          "order": (c_bounded(c_int, 0, 18, "an order"), 0), "compound": (c_bool, True), "prefault": (c_bool, True),
          "pte_write": (c_choice("always", "on_write_fault", "never"), "always"), "mixed": (c_bool, False),
          "free_rule": (c_choice("free", "put"), "free"),
          # the driver's vm_page_prot: cacheable (Normal memory, e.g. nvgrace-gpu's device memory) or not
          "cacheable": (c_bool, False)}

#: The host kernel's mm settings (``[host]``).
HOST = {"thp_zero_page": (c_bool, True),        # /sys/kernel/mm/transparent_hugepage/use_zero_page
        "swap": (c_bool, True),                 # a swap device (total_swap_pages > 0)
        "kernel": (c_choice("6.12", "6.13"), "6.13")}   # the host mm's release (the huge zero PMD write fault)

VMA = {"name": (c_str, REQUIRED), "kind": (c_choice(*(k.value for k in VmaKind)), REQUIRED),
       "size": (c_bounded(c_size, 1, MAX_BYTES, "a VMA size"), REQUIRED), "page_size": (c_size, 4096),
       "thp": (c_bool, False),
       "prot": (c_choice("rw", "r", "w", "none"), "rw"), "driver": (c_str, None),
       "writenotify": (c_bool, None), "io": (c_bool, False)}


def c_policies(v: Any) -> tuple[str, ...]:
    names = c_strlist(v)
    out: list[str] = []
    for n in names:
        for p in POLICY_ALIASES.get(n.lower(), (n.lower(),)):
            if p not in POLICIES:
                raise ValueError(f"expected a policy ({', '.join(POLICIES)}, both or all), got {n!r}")
            if p not in out:
                out.append(p)
    if not out:
        raise ValueError("expected at least one policy")
    return tuple(out)


def c_mutations(v: Any) -> tuple[str, ...]:
    names = c_strlist(v)
    known = ("skip-retry", "nonatomic-spte", "mark-dirty-after-unlock")
    for n in names:
        if n not in known:
            raise ValueError(f"expected mutations from {', '.join(known)}, got {n!r}")
    return tuple(names)


VM = {"policy": (c_policies, ("legacy", "series")),
      "arch": (c_choice(*ARCH_NAMES), "x86"),
      "mmu": (c_choice("tdp", "shadow"), "tdp"), "paging": (c_choice("direct", "indirect"), "direct"), "pml": (c_bool, True), "manual_protect": (c_bool, False),
      "initially_set": (c_bool, False),
      "dirty_ring": (c_bounded(c_int, 0, 1 << 24, "a ring size in bytes"), 0), "v613_other": (c_bool, None),
      "allow_unsafe_mappings": (c_bool, False), "execution": (c_choice("hardware", "emulated"), "hardware"),
      "vcpus": (c_bounded(c_int, 1, 64, "a vCPU count"), 1), "mutations": (c_mutations, ()),
      "mte": (c_bool, False),
      "ppc_pr_host": (c_choice("64-bit", "32-bit"), "64-bit"),
      # x86 MMU knobs (kvm_intel/kvm_amd module parameters and a KVM_CAP_DISABLE_QUIRKS2 quirk)
      "ad_enabled": (c_bool, True), "eager_split": (c_bool, True), "slot_zap_all": (c_bool, True),
      "nx_huge_pages": (c_bool, False), "async_pf": (c_bool, False),
      "maxphyaddr": (c_bounded(c_int, 32, 52, "a MAXPHYADDR (CPUID.0x80000008:EAX[7:0])"), 46),
      # the other arches' guest physical address widths
      "ipa_bits": (c_bounded(c_int, 32, 52, "an IPA size (KVM_VM_TYPE_ARM_IPA_SIZE)"), 40),
      "cpu_vabits": (c_bounded(c_int, 40, 48, "a CPUCFG1.VALEN"), 48),
      "gstage_pgd_levels": (c_bounded(c_int, 3, 5, "G-stage levels (3 Sv39x4, 4 Sv48x4, 5 Sv57x4)"), 3),
      "dirty_ring_with_bitmap": (c_bool, False),
      # arm64 KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED: the CPUs have stage-2 FWB and DIC (v6.17)
      "cacheable_pfnmap_supported": (c_bool, True)}

#: VM keys only one arch's MMU reads (the loader refuses them with another arch).
ARCH_VM_KEYS = {**dict.fromkeys(("ad_enabled", "eager_split", "slot_zap_all", "nx_huge_pages", "async_pf",
                                 "maxphyaddr"), "x86"),
                "ipa_bits": "arm64", "cacheable_pfnmap_supported": "arm64", "cpu_vabits": "loongarch", "gstage_pgd_levels": "riscv"}


def c_memflags(v: Any) -> tuple[str, ...]:
    names = [n.lower().removeprefix("kvm_mem_") for n in c_strlist(v)]
    for n in names:
        if n not in MEM_FLAGS:
            raise ValueError(f"expected memslot flags from {', '.join(MEM_FLAGS)}, got {n!r}")
    return tuple(names)


MEMSLOT = {"id": (c_int, REQUIRED), "gpa": (c_size, REQUIRED),
           "size": (c_bounded(c_size, 0, MAX_BYTES, "a memslot size"), REQUIRED), "vma": (c_str, REQUIRED),
           "offset": (c_size, 0), "flags": (c_memflags, ()), "guest_memfd": (c_str, None),
           "guest_memfd_offset": (c_size, 0)}
GUEST_MEMFD = {"name": (c_str, REQUIRED), "size": (c_bounded(c_size, 1, MAX_BYTES, "a guest_memfd size"), REQUIRED),
               "flags": (c_int, 0)}


STEP_EXPECT = {"exit": (c_exit, None), "result": (c_result, None), "errno": (c_errno, None), "value": (c_any, None),
               "violations": (c_violations, None), "counters": (c_counters, None)}
FINAL_EXPECT = {"verdict": (c_choice("clean", "violations", "error"), None), "violations": (c_violations, None),
                "counters": (c_counters, {})}


def _step_expect(ctx: _Ctx, path: tuple, value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise ctx.error(path, f"expected a table of expectations, got {value!r}")
    common = {k: v for k, v in value.items() if k not in POLICIES}
    out: dict[str, dict[str, Any]] = {}
    if common:
        out["*"] = {k: v for k, v in _table(ctx, path, common, STEP_EXPECT).items() if v is not None}
    for p in POLICIES:
        if p in value:
            out[p] = {k: v for k, v in _table(ctx, path + (p,), value[p], STEP_EXPECT).items() if v is not None}
    return out


def _step(ctx: _Ctx, path: tuple, raw: Any, *, nested: bool = False) -> Step:
    from kvmsim.scenarios.ops import INTERLEAVABLE, OP_ARGS
    if not isinstance(raw, dict):
        raise ctx.error(path, f"expected a table, got {raw!r}")
    if "op" not in raw:
        raise ctx.error(path, "missing required key 'op'")
    op = raw["op"]
    if not isinstance(op, str) or op not in OP_ARGS:
        raise ctx.error(path + ("op",), f"unknown op {op!r}; expected one of: {', '.join(sorted(OP_ARGS))}")
    if nested and op not in INTERLEAVABLE:
        raise ctx.error(path + ("op",), f"op {op!r} cannot be an interleave thread; expected one of: "
                                        f"{', '.join(sorted(INTERLEAVABLE))}")
    schema = dict(OP_ARGS[op])
    schema["op"] = (c_str, REQUIRED)
    if not nested:
        schema["expect"] = (c_any, None)
    args = _table(ctx, path, raw, schema)
    args.pop("op")
    expect = args.pop("expect", None)
    if op == "interleave":
        threads = args["threads"]
        if not isinstance(threads, dict) or not threads:
            raise ctx.error(path + ("threads",), "expected a table of named threads, each {op = ..., ...}")
        args["threads"] = {name: _step(ctx, path + ("threads", name), t, nested=True) for name, t in threads.items()}
        if not args["order"]:
            raise ctx.error(path + ("order",), "expected at least one thread name: order = [] schedules nothing, "
                                               "so the threads would just run one after the other")
        for i, name in enumerate(args["order"]):
            if name not in args["threads"]:
                raise ctx.error(path + ("order",), f"order[{i}] names {name!r}, not one of the threads "
                                                   f"({', '.join(args['threads'])})")
    return Step(op, args, _step_expect(ctx, path + ("expect",), expect) if expect is not None else {},
                ctx.src.find(path))


def scenario_from_dict(doc: Any, *, file: str = "<scenario>", text: str | None = None) -> Scenario:
    """Validate a parsed document (from TOML or the builder) into a :class:`Scenario`."""
    ctx = _Ctx(file, text)
    top = _table(ctx, (), doc, TOP)
    sc = Scenario(name=top["name"], description=top["description"], source=top["source"],
                  patches=top["patches"], requires=tuple(top["requires"]), file=file)
    for i, d in enumerate(_array(ctx, ("driver",), top["driver"])):
        t = _table(ctx, ("driver", i), d, DRIVER)
        if t["name"] in {x.name for x in sc.drivers}:
            raise ctx.error(("driver", i, "name"), f"a second [[driver]] named {t['name']!r}: names must be unique")
        if t["size"] is not None and t["size"] % 4096:
            raise ctx.error(("driver", i, "size"), f"expected a multiple of 4K, got {t['size']:#x}")
        sc.drivers.append(DriverSpec(**t, line=ctx.src.find(("driver", i))))
    drivers = {d.name for d in sc.drivers}
    for i, v in enumerate(_array(ctx, ("vma",), top["vma"])):
        t = _table(ctx, ("vma", i), v, VMA)
        if t["name"] in {x.name for x in sc.vmas}:
            raise ctx.error(("vma", i, "name"), f"a second [[vma]] named {t['name']!r}: names must be unique")
        if t["kind"] in ("pfnmap", "mixedmap") and t["driver"] is None:
            raise ctx.error(("vma", i), f"a {t['kind']} VMA needs driver = \"<name of a [[driver]]>\"")
        if t["driver"] is not None and t["driver"] not in drivers:
            raise ctx.error(("vma", i, "driver"), f"no [[driver]] named {t['driver']!r} (have: "
                                                  f"{', '.join(sorted(drivers)) or 'none'})")
        if t["io"] and t["kind"] != "mixedmap":
            raise ctx.error(("vma", i, "io"), f"io = true (VM_IO) is for a mixedmap VMA (a pfnmap VMA always has "
                                              f"VM_PFNMAP|VM_IO); got kind = {t['kind']!r}")
        if t["page_size"] not in (4096, 1 << 21, 1 << 30):
            raise ctx.error(("vma", i, "page_size"), f"expected 4K, 2M or 1G, got {t['page_size']:#x}")
        if (t["kind"] == "hugetlb") != (t["page_size"] != 4096):
            raise ctx.error(("vma", i, "page_size") if "page_size" in v else ("vma", i, "kind"),
                            "a hugetlb VMA has 2M or 1G pages (page_size = \"2M\" or \"1G\"), every other kind 4K "
                            f"(THP: thp = true); got kind = {t['kind']!r} with page_size {t['page_size']:#x}")
        if t["size"] <= 0 or t["size"] % t["page_size"]:
            raise ctx.error(("vma", i, "size"), f"expected a positive multiple of page_size {t['page_size']:#x}, "
                                                f"got {t['size']:#x}")
        sc.vmas.append(VmaSpec(**t, line=ctx.src.find(("vma", i))))
    names = [v.name for v in sc.vmas]
    sc.host = HostSpec(**_table(ctx, ("host",), top["host"], HOST))
    vm = _table(ctx, ("vm",), top["vm"], VM)
    if vm["mte"] and vm["arch"] != "arm64":
        raise ctx.error(("vm", "mte"), f"mte = true (KVM_CAP_ARM_MTE) needs arch = \"arm64\", not {vm['arch']!r}")
    for k, arch in ARCH_VM_KEYS.items():
        if vm["arch"] != arch and k in top["vm"] and vm[k] != VM[k][1]:
            raise ctx.error(("vm", k), f"{k} = {str(vm[k]).lower()} is an {arch} MMU option; arch is {vm['arch']!r}")
    if vm["dirty_ring_with_bitmap"] and not vm["dirty_ring"]:
        raise ctx.error(("vm", "dirty_ring_with_bitmap"), "dirty_ring_with_bitmap = true "
                        "(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) needs dirty_ring = <size in bytes> as well")
    sc.vm = VmSpec(policies=vm.pop("policy"), **vm)
    for i, g in enumerate(_array(ctx, ("guest_memfd",), top["guest_memfd"])):
        t = _table(ctx, ("guest_memfd", i), g, GUEST_MEMFD)
        if t["name"] in {x.name for x in sc.guest_memfds}:
            raise ctx.error(("guest_memfd", i, "name"), f"a second [[guest_memfd]] named {t['name']!r}: names must be unique")
        sc.guest_memfds.append(GuestMemfdSpec(**t, line=ctx.src.find(("guest_memfd", i))))
    gmems = [g.name for g in sc.guest_memfds]
    for i, s in enumerate(_array(ctx, ("memslot",), top["memslot"])):
        t = _table(ctx, ("memslot", i), s, MEMSLOT)
        if t["guest_memfd"] is not None and t["guest_memfd"] not in gmems:
            raise ctx.error(("memslot", i, "guest_memfd"), f"no [[guest_memfd]] named {t['guest_memfd']!r} "
                                                           f"(have: {', '.join(gmems) or 'none'})")
        if t["vma"] not in names:
            raise ctx.error(("memslot", i, "vma"),
                            f"no [[vma]] named {t['vma']!r} (have: {', '.join(names) or 'none'})")
        for k in ("gpa", "size", "offset", "guest_memfd_offset"):
            if t[k] % 4096:
                raise ctx.error(("memslot", i, k), f"expected a multiple of 4K, got {t[k]:#x} "
                                                   "(KVM_SET_USER_MEMORY_REGION refuses it with EINVAL)")
        if not 0 <= t["id"] < 1 << 32:
            raise ctx.error(("memslot", i, "id"), f"expected a slot number 0 .. 0xffffffff (as_id << 16 | id), "
                                                  f"got {t['id']}")
        if t["id"] in {m.id for m in sc.memslots}:
            raise ctx.error(("memslot", i, "id"), f"a second [[memslot]] with id = {t['id']}: ids must be unique "
                                                  "(change a slot with a memslot_* step)")
        sc.memslots.append(SlotSpec(**t, line=ctx.src.find(("memslot", i))))
    for i, s in enumerate(_array(ctx, ("step",), top["step"])):
        sc.steps.append(_step(ctx, ("step", i), s))
    exp = top["expect"]
    if not isinstance(exp, dict):
        raise ctx.error(("expect",), f"expected [expect.<policy>] tables, got {exp!r}")
    for p, e in exp.items():
        if p not in POLICIES:
            raise ctx.error(("expect", p), f"unknown policy {p!r}; expected one of: {', '.join(POLICIES)}")
        t = _table(ctx, ("expect", p), e, FINAL_EXPECT)
        why = check_final(t["verdict"], t["violations"])
        if why:
            raise ctx.error(("expect", p, "verdict"), why)
        sc.expect[p] = FinalExpect(**t, line=ctx.src.find(("expect", p)))
    check_steps(sc, ctx.error)
    return sc


_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def loads(text: str, file: str = "<string>") -> Scenario:
    """Parse scenario TOML text."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POS.search(str(e))
        raise ScenarioError(f"not valid TOML: {_TOML_POS.sub('', str(e)).strip()}", file=file,
                            line=int(m.group(1)) if m else None) from None
    return scenario_from_dict(doc, file=file, text=text)


def read_text(path: str | Path) -> str:
    """The text of scenario file ``path``: at most :data:`MAX_FILE_BYTES`, UTF-8, a file (not a directory)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
                raise ScenarioError("is a directory, not a scenario file", file=str(p))
            data = f.read(MAX_FILE_BYTES + 1)
    except IsADirectoryError:
        raise ScenarioError("is a directory, not a scenario file", file=str(p)) from None
    except OSError as e:
        raise ScenarioError(f"cannot read scenario file: {e.strerror or e}", file=str(p)) from None
    if len(data) > MAX_FILE_BYTES:
        raise ScenarioError(f"larger than {MAX_FILE_BYTES >> 10} KiB: not a scenario file", file=str(p))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ScenarioError(f"not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})", file=str(p),
                            line=line) from None


def load(path: str | Path) -> Scenario:
    """Read and parse a scenario file."""
    return loads(read_text(path), file=str(path))
