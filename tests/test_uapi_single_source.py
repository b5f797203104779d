"""The kernel's names are defined once, errnos come from ``errno``, page/PTE bits by name.

AST checks over ``src/kvmsim`` (no imports of the code under test):

* ``KVM_MEM_*`` memslot flags, ``KVM_EXIT_*`` exit reasons, the ``Exit`` enum and the ``Access``
  record are defined in one module, :mod:`kvmsim.uapi`; no other module keeps its own copy (a class, a
  ``KVM_*`` constant, a ``{"readonly": 2}`` table or an ``F_RO = 2`` alias).
* Model code has no raw errno literals: no ``return -133``, ``rc == -4``, ``rc in (-4, -11)``,
  ``ModelError(22, ...)``, ``KvmIoctlError(name, 14)``, ``Access(..., 133)``; ``-1`` sentinels are not
  errnos and are allowed.
* Page, PTE and memslot flag words are not tested against raw bits (``pte & 1``,
  ``flags & (1 << 9)``): they use the ``PG``/``Pte``/``KVM_MEM`` names or ints derived from them.

``KNOWN_PENDING`` lists the files another helper of issue 12 is rewriting (seam-core, seam-sched):
their findings are reported, not failed, until the lead converts them after merging.  Each entry
must still have a finding, so the list cannot go stale silently.
"""

from __future__ import annotations

import ast
import errno
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kvmsim"
UAPI = "uapi.py"
#: Model code: the packages that mirror the kernel (scanned for raw errnos).
MODEL_DIRS = ("mm", "kvm", "x86", "arm64", "riscv", "policies")
#: Also scanned for raw errnos: the rest of kvmsim that reports model errnos.
ERRNO_EXTRA = ("scenarios", "explore", "check.py", "backend/model.py")
EHWPOISON = 133                      # include/uapi/asm-generic/errno.h
ERRNOS = frozenset(errno.errorcode) | {EHWPOISON}
#: Small negative ints that are sentinels in the model, never errnos it returns (-1: no pfn / no leaf).
SENTINELS = frozenset({1})

# Files owned by seam-core / seam-sched while issue 12 is in flight; the lead empties this list after
# merging their branches and converting what the tests below report for them.
KNOWN_PENDING: set[str] = set()     # seam-core converted its files (kvm/, x86/, arm64/, riscv/, policies/)


def _rel(p: Path) -> str:
    return p.relative_to(SRC).as_posix()


def _files(parts=None) -> list[Path]:
    out = []
    for p in sorted(SRC.rglob("*.py")):
        rel = _rel(p)
        if parts is None or any(rel == d or rel.startswith(d + "/") for d in parts):
            out.append(p)
    return out


def _tree(p: Path) -> ast.Module:
    return ast.parse(p.read_text(), filename=str(p))


def _const_int(node: ast.AST) -> int | None:
    """The value of an int literal or a constant expression of them (``1 << 9``, ``-133``)."""
    if not all(isinstance(n, (ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop))
               for n in ast.walk(node)):
        return None
    try:
        v = eval(compile(ast.Expression(node), "<const>", "eval"), {"__builtins__": {}})  # noqa: S307
    except Exception:
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _neg_errno(node: ast.AST) -> int | None:
    """``-N`` where N is an errno (not a sentinel)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _const_int(node.operand)
        if v is not None and v in ERRNOS and v not in SENTINELS:
            return v
    return None


# ---- definitions --------------------------------------------------------------------------------

_KVM_MEM_MEMBERS = {"LOG_DIRTY_PAGES", "KVM_MEM_LOG_DIRTY_PAGES"}
_FLAG_WORDS = ("LOG", "RO", "READONLY", "GMEM", "MEMFD")


def _definitions(tree: ast.Module) -> dict[str, list[int]]:
    """What a module defines of the shared names: kind -> line numbers."""
    found: dict[str, list[int]] = defaultdict(list)
    members_of_classes = {id(s) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for s in c.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            if node.name in ("Exit", "Access"):
                found[node.name].append(node.lineno)
            members = {t.id for s in node.body if isinstance(s, ast.Assign)
                       for t in s.targets if isinstance(t, ast.Name)}
            if node.name == "KVM_MEM" or members & _KVM_MEM_MEMBERS:
                found["KVM_MEM"].append(node.lineno)
        elif isinstance(node, ast.Assign) and id(node) not in members_of_classes:
            pairs = []
            for t in node.targets:
                if isinstance(t, ast.Name):
                    pairs.append((t.id, node.value))
                elif isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs += [(e.id, v) for e, v in zip(t.elts, node.value.elts) if isinstance(e, ast.Name)]
            for name, value in pairs:
                if name.startswith("KVM_MEM_"):
                    found["KVM_MEM"].append(node.lineno)
                elif name.startswith("KVM_EXIT_"):
                    found["KVM_EXIT_"].append(node.lineno)
                elif _const_int(value) in (1, 2, 4) and name.upper().split("_")[-1] in _FLAG_WORDS:
                    found["KVM_MEM"].append(node.lineno)          # F_RO = 2
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and isinstance(k.value, str) and \
                        k.value.lower().removeprefix("kvm_mem_") in ("log_dirty_pages", "readonly", "guest_memfd") \
                        and _const_int(v) is not None:
                    found["KVM_MEM"].append(node.lineno)          # {"readonly": 2}
    return found


def test_definition_scan_sees_the_old_copies():
    """The scanner recognises each shape of duplicate the review found (so the next test can pass
    only because they are gone, not because the scanner is blind)."""
    src = '''
class KVM_MEM(IntFlag):
    LOG_DIRTY_PAGES = 1
class KvmMemFlags(IntFlag):
    KVM_MEM_LOG_DIRTY_PAGES = 1
MEM_FLAGS = {"log_dirty_pages": 1, "readonly": 2}
F_LOG, F_RO, F_GMEM = 1, 2, 4
KVM_EXIT_MMIO = 6
class Exit(str, Enum):
    OK = "ok"
class Access:
    pass
'''
    found = _definitions(ast.parse(src))
    assert sorted(set(found["KVM_MEM"])) == [2, 4, 6, 7]          # two classes, a dict, a tuple of aliases
    assert found["KVM_EXIT_"] == [8] and found["Exit"] == [9] and found["Access"] == [11]


def test_kvm_names_defined_once():
    where: dict[str, set[str]] = defaultdict(set)
    for p in _files():
        for kind, lines in _definitions(_tree(p)).items():
            where[kind] |= {f"{_rel(p)}:{n}" for n in lines}
    for kind in ("KVM_MEM", "KVM_EXIT_", "Exit", "Access"):
        modules = {w.split(":")[0] for w in where[kind]}
        assert modules == {UAPI}, f"{kind} defined outside kvmsim/uapi.py: {sorted(where[kind])}"


# ---- errnos ----------------------------------------------------------------------------------------

def _raw_errnos(tree: ast.Module) -> list[tuple[int, str]]:
    out = []

    def hit(node, why):
        out.append((node.lineno, f"{why}: {ast.unparse(node)[:80]}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None:
            vals = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            if any(_neg_errno(v) is not None for v in vals):
                hit(node, "returns a raw -errno")
        elif isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(_neg_errno(e) is not None for e in elts):
                    hit(node, "compares with a raw -errno")
                    break
        elif isinstance(node, ast.Call):
            fn = node.func.id if isinstance(node.func, ast.Name) else \
                node.func.attr if isinstance(node.func, ast.Attribute) else ""
            pos = {"ModelError": 0, "KvmIoctlError": 1, "Access": 4}.get(fn)
            args = [a for a in node.args]
            arg = args[pos] if pos is not None and len(args) > pos else None
            if arg is None and pos is not None:
                arg = next((k.value for k in node.keywords if k.arg in ("err", "errno")), None)
            v = _const_int(arg) if arg is not None else None
            if v is not None and v != 0 and abs(v) in ERRNOS:
                hit(node, f"{fn}() with a raw errno")
        elif isinstance(node, ast.Dict):
            keys = [_const_int(k) for k in node.keys if k is not None]
            if keys and all(k is not None and k in ERRNOS for k in keys) and EHWPOISON in keys:
                hit(node, "a table keyed by raw errnos")
    return out


def test_errno_scan_sees_raw_literals():
    """The scanner finds each shape the review found, and leaves sentinels and named errnos alone."""
    bad = '''
def f(rc, r):
    if rc == -133: pass
    if rc in (-4, -11): pass
    raise ModelError(22, "x")
    raise KvmIoctlError("KVM_RUN", 14)
    a = Access(Exit.HWPOISON, 0, False, None, 133)
    t = {14: "efault", 4: "eintr", 133: "hwpoison"}
    return -133
'''
    good = '''
def f(rc, pfn):
    if pfn == -1: return -1
    if rc == -errno.EINTR: return -EHWPOISON
    raise ModelError(errno.EINVAL, "x")
    return Access(Exit.OK, 0, False, None, 0), (-1, 0)
'''
    assert sorted(n for n, _ in _raw_errnos(ast.parse(bad))) == [3, 4, 5, 6, 7, 8, 9]
    assert _raw_errnos(ast.parse(good)) == []


def _scan_errnos() -> dict[str, list[str]]:
    found = {}
    for p in _files(MODEL_DIRS + ERRNO_EXTRA):
        hits = _raw_errnos(_tree(p))
        if hits:
            found[_rel(p)] = [f"{_rel(p)}:{n}: {why}" for n, why in hits]
    return found


# ---- page / PTE / memslot bits ----------------------------------------------------------------------

_BIT_WORDS = ("pte", "bits", "flags", "spte")


def _raw_bits(tree: ast.Module) -> list[tuple[int, str]]:
    """``word & 1``, ``word |= 1``, ``flags & (1 << 9)`` where ``word`` names a PTE/page/slot flag word."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            pairs = [(node.left, node.right), (node.right, node.left)]
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            pairs = [(node.target, node.value)]
        else:
            continue
        for word, bit in pairs:
            v = _const_int(bit)
            name = ast.unparse(word).lower()
            if v is not None and 0 < v <= 1 << 16 and v & (v - 1) == 0 and \
                    any(w in name for w in _BIT_WORDS):
                out.append((node.lineno, ast.unparse(node)[:80]))
                break
    return out


def test_bit_scan_sees_raw_bits():
    bad = '''
present = (vma.pte[i0:i1] & 1)
ok &= (kvm.phys.flags[p] & (1 << 9)) == 0
phys.flags[head] |= 1
ro = int(self.flags) & 2
'''
    good = '''
present = vma.pte[j] & _P
ok &= (phys.flags[p] & int(PG.poisoned)) == 0
as_id, sid = slot >> 16, slot & 0xFFFF
'''
    assert sorted(n for n, _ in _raw_bits(ast.parse(bad))) == [2, 3, 4, 5]
    assert _raw_bits(ast.parse(good)) == []


def _scan_bits() -> dict[str, list[str]]:
    found = {}
    for p in _files():
        if _rel(p).startswith("backend/kvm/"):
            continue                 # the real backend's ctypes/ABI words are C's, not page flags
        hits = _raw_bits(_tree(p))
        if hits:
            found[_rel(p)] = [f"{_rel(p)}:{n}: {src}" for n, src in hits]
    return found


@pytest.mark.parametrize("scan", [_scan_errnos, _scan_bits], ids=["errnos", "bits"])
def test_no_raw_literals_outside_pending(scan):
    found = scan()
    new = [h for f, hs in found.items() if f not in KNOWN_PENDING for h in hs]
    assert not new, "raw literals (use errno.E*/EHWPOISON, PG/Pte/KVM_MEM names):\n" + "\n".join(new)


def test_known_pending_is_not_stale():
    """Every KNOWN_PENDING file still has a finding; a converted file must leave the list."""
    found = set(_scan_errnos()) | set(_scan_bits())
    stale = sorted(KNOWN_PENDING - found)
    assert not stale, f"no raw literals left in {stale}: remove them from KNOWN_PENDING"


def _imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_uapi_is_a_leaf_and_the_model_never_imports_the_backend():
    """uapi.py imports nothing from kvmsim; no model module imports ``kvmsim.backend`` (the shared
    names reach the model through uapi.py, never through the real-KVM backend)."""
    assert not {m for m in _imports(_tree(SRC / UAPI)) if m.split(".")[0] == "kvmsim"}
    bad = {f"{_rel(p)}: {m}" for p in _files(MODEL_DIRS) for m in _imports(_tree(p))
           if m.startswith("kvmsim.backend")}
    assert not bad, sorted(bad)
