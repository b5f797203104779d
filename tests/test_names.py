"""docs/names.md is true: every model name its table lists exists in the model.

Each backticked name in the *model* column (the right-hand one) is resolved: a dotted path from a
kvmsim module (``kvm.pfn.gfn_to_page``, ``mm.page.PhysMem``) is imported and its attribute looked
up; a ``Class.member`` or bare name must be defined somewhere under src/kvmsim (a function, class,
method, enum member, module constant or ``self.`` attribute, found by AST).  ``a/b`` and ``x(_y)``
spellings expand to each name, and a ``.member`` continues the class named before it in the cell.

Kernel names the model keeps verbatim are listed in :data:`VERBATIM`; add to it (or to the table)
as names move to their kernel spelling.  :data:`PENDING` are names issue 12's x86 work adds.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

import kvmsim

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES_MD = ROOT / "docs" / "names.md"
SRC = pathlib.Path(kvmsim.__file__).resolve().parent

#: Kernel functions, structs and constants the model defines under the kernel's own name.
VERBATIM = [
    "handle_mm_fault", "get_user_page_fast_only", "get_user_pages_unlocked", "follow_pfnmap_start",
    "fixup_user_fault", "mmu_invalidate_retry_gfn", "kvm_follow_pfn", "hva_to_pfn", "hva_to_pfn_remapped",
    "kvm_release_page_clean", "kvm_release_page_dirty", "kvm_pfn_to_refcounted_page", "kvm_set_pfn_dirty",
    "kvm_set_pfn_accessed", "gfn_to_page", "kvm_prefetch_pages", "kvm_vcpu_map", "kvm_vcpu_unmap",
    "kvm_gmem_get_pfn", "mark_page_dirty_in_slot", "kvm_get_dirty_log", "kvm_clear_dirty_log",
    "user_mem_abort", "handle_access_fault", "memslot_is_logging", "kvm_pgtable_stage2_map",
    "kvm_riscv_gstage_map", "gstage_map_page", "SetPageDirty", "mark_page_accessed", "RET_PF",
    "kvm_mmu_faultin_pfn", "kvm_zap_gfn_range", "kvm_mmu_page_fault", "kvm_tdp_page_fault", "kvm_tdp_mmu_map",
    "make_spte", "mmu_set_spte", "kvm_mmu_finish_page_fault", "kvm_release_faultin_page", "host_pfn_mapping_level",
]

#: Kernel names issue 12 moves into x86/ and kvm/ (seam-core): strict xfail until they exist, then
#: move each into VERBATIM (an XPASS here says which).
PENDING: list[str] = []


def _index() -> tuple[set[str], dict[str, set[str]]]:
    """Every name defined under src/kvmsim, and each class's members (methods, class and self. attributes)."""
    names: set[str] = set()
    members: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for el in ast.walk(t):
                        if isinstance(el, ast.Name):
                            names.add(el.id)
                        elif isinstance(el, ast.Attribute):
                            names.add(el.attr)
            if isinstance(node, ast.ClassDef):
                mine = members.setdefault(node.name, set())
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        mine.add(sub.name)
                    elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                        mine.add(sub.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store):
                        mine.add(sub.attr)
    return names, members


NAMES, MEMBERS = _index()


def _expand(name: str) -> list[str]:
    """``a/b/c`` → the last component varies (``kvm_release_page_clean/dirty``); ``x(_y)`` → x, x_y."""
    m = re.fullmatch(r"(.*?)\((_?\w+)\)", name)
    if m:
        return [m.group(1), m.group(1) + m.group(2)]
    if "/" in name:
        first, *rest = name.split("/")
        stem = first.rsplit("_", 1)[0] + "_" if "_" in first.rsplit(".", 1)[-1] else ""
        return [first] + [stem + r if stem and "." not in r else r for r in rest]
    return [name]


def _model_names() -> list[tuple[str, str]]:
    """``(row's kernel cell, model name)`` for every backticked name of the model column."""
    out = []
    for line in NAMES_MD.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[1].startswith(("`", "kvm", "mm", "policy")) or set(cells[1]) <= {"-"}:
            continue
        cls = None
        for raw in re.findall(r"`([^`]+)`", cells[1]):
            for name in _expand(raw):
                if name.startswith(".") and cls:
                    name = cls + name
                head = name.split(".")
                if len(head) >= 2 and head[-2][:1].isupper():
                    cls = head[-2]
                elif head[-1][:1].isupper():
                    cls = head[-1]
                out.append((cells[0], name))
    return out


MODEL_NAMES = _model_names()


def resolves(name: str) -> bool:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):                 # longest importable kvmsim module prefix
        try:
            mod = importlib.import_module("kvmsim." + ".".join(parts[:k]))
        except ImportError:
            continue
        obj = mod
        for attr in parts[k:]:
            if not hasattr(obj, attr):
                return attr in MEMBERS.get(getattr(obj, "__name__", ""), set())
            obj = getattr(obj, attr)
        return True
    if len(parts) >= 2 and parts[-2] in MEMBERS:
        return parts[-1] in MEMBERS[parts[-2]] or parts[-1] in NAMES
    return parts[-1] in NAMES


def test_the_table_is_parsed():
    assert len(MODEL_NAMES) > 60 and ("`__kvm_faultin_pfn`", "kvm.pfn._kvm_faultin_pfn") in MODEL_NAMES


@pytest.mark.parametrize("kernel,name", MODEL_NAMES, ids=[n for _, n in MODEL_NAMES])
def test_every_model_name_in_the_table_exists(kernel, name):
    assert resolves(name), f"docs/names.md row {kernel}: {name} is not defined in the model"


@pytest.mark.parametrize("name", VERBATIM)
def test_kernel_name_kept_verbatim(name):
    assert name in NAMES, f"{name} is not defined under its kernel name"


def test_no_kernel_name_is_pending():
    """Every issue-12 kernel name arrived (they moved to VERBATIM); a name added to PENDING is one the
    model still lacks, and this says which."""
    assert [n for n in PENDING if n not in NAMES] == PENDING
    assert not PENDING, f"kernel names still to add under their own name: {', '.join(PENDING)}"


def test_the_resolver_can_say_no():
    assert not resolves("kvm.pfn.kvm_no_such_function") and not resolves("PhysMem.no_such_member")
