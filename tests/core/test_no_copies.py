"""No block of six or more code lines is repeated between two architecture folders, or between an
architecture folder and ``kvm/`` (issue 12: "no arch module repeats the fault prologue").

The folders compared are ``kvm/`` and every architecture package under ``src/kvmsim``: each package
except the ones that are not an architecture (:data:`NOT_ARCH`), so a new arch folder (loongarch,
mips, s390, ppc, ...) is checked as soon as it exists.  Lines are normalised before comparing: the
code tokens of each physical line joined by single spaces, so indentation, spacing, comments and
docstrings do not count; blank lines, comment-only and docstring lines, and import statements (the
same ``from kvmsim.kvm.fault import ...`` in two arch modules is not a copy of logic) are dropped.
Any window of :data:`WINDOW` consecutive normalised lines found in two different folders fails the
test, naming both files and their line ranges.
"""

from __future__ import annotations

import ast
import io
import pathlib
import tokenize

import kvmsim

SRC = pathlib.Path(kvmsim.__file__).resolve().parent
#: Packages under src/kvmsim that are not architectures (``kvm`` is compared, as the generic side).
NOT_ARCH = {"mm", "scenarios", "backend", "bench", "explore", "policies"}
WINDOW = 6
_SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
         tokenize.ENCODING, tokenize.ENDMARKER}


def folders(src: pathlib.Path = SRC) -> list[pathlib.Path]:
    """``kvm/`` and every architecture package under ``src``."""
    return sorted(p for p in src.iterdir()
                  if p.is_dir() and (p / "__init__.py").exists() and p.name not in NOT_ARCH)


def _skipped_lines(tree: ast.AST) -> set[int]:
    """Lines of docstrings and import statements."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.update(range(first.lineno, first.end_lineno + 1))
    return out


def _owners(tree: ast.AST, nlines: int) -> list[int]:
    """For each line, the innermost function or class definition it belongs to (its decorators
    included), as an id; 0 for module level."""
    owner = [0] * (nlines + 2)
    for node in ast.walk(tree):                     # breadth first: an inner definition comes later
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            owner[start:node.end_lineno + 1] = [id(node)] * (node.end_lineno + 1 - start)
    return owner


def normalised_blocks(text: str) -> list[list[tuple[int, str]]]:
    """The code of ``text`` as runs of ``(line number, normalised code)`` (module docstring), one run
    per stretch of lines in the same definition, so a window never joins the end of one function to
    the start of the next."""
    tree = ast.parse(text)
    skip = _skipped_lines(tree)
    by_line: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in _SKIP or tok.start[0] in skip:
            continue
        by_line.setdefault(tok.start[0], []).append(tok.string)
    owner = _owners(tree, text.count("\n") + 1)
    blocks: list[list[tuple[int, str]]] = []
    prev = None
    for n, parts in sorted(by_line.items()):
        if owner[n] != prev:
            blocks.append([])
            prev = owner[n]
        blocks[-1].append((n, " ".join(parts)))
    return blocks


def _windows(d: pathlib.Path, window: int):
    """``(path relative to d's parent, k, first line, last line, normalised window)`` for every
    window of ``window`` lines inside one block of each module under ``d``."""
    for path in sorted(d.rglob("*.py")):
        rel = path.relative_to(d.parent)
        for b, lines in enumerate(normalised_blocks(path.read_text())):
            for k in range(len(lines) - window + 1):
                yield rel, (b, k), lines[k][0], lines[k + window - 1][0], tuple(c for _, c in lines[k:k + window])


def copies(dirs: list[pathlib.Path], window: int = WINDOW) -> list[str]:
    """Each window of ``window`` normalised lines that occurs in two of ``dirs``, as a message naming
    both places (a copy longer than one window is reported once, at its first window)."""
    seen: dict[tuple[str, ...], tuple[str, pathlib.Path, int, int]] = {}
    found: list[str] = []
    last: dict[tuple[pathlib.Path, pathlib.Path], tuple[int, int]] = {}
    for d in dirs:
        for rel, (b, k), first, end, key in _windows(d, window):
            other = seen.setdefault(key, (d.name, rel, first, end))
            if other[0] == d.name:
                continue
            pair = (other[1], rel)
            extends = last.get(pair) == (b, k - 1)         # the same copy, one line further
            last[pair] = (b, k)
            if not extends:
                found.append(f"{other[1]}:{other[2]}-{other[3]} and {rel}:{first}-{end} share {window}+ "
                             "lines:\n    " + "\n    ".join(key))
    return found


def test_the_folders_compared_include_kvm_and_every_arch():
    """Every package a stage-2 profile lives in (``kvm.arch.ARCH_PROFILES``) is compared."""
    from kvmsim.kvm.arch import ARCH_PROFILES
    names = {d.name for d in folders()}
    assert {"kvm", "x86", "arm64", "riscv"} <= names
    assert {module.split(".")[1] for module, _ in ARCH_PROFILES.values()} <= names
    assert not names & NOT_ARCH


def test_no_block_of_six_lines_is_repeated_between_arch_folders_and_kvm():
    found = copies(folders())
    assert not found, "copied blocks (move them into kvm/ or a shared helper):\n" + "\n".join(found)


def test_the_check_finds_a_copy(tmp_path):
    """The detector itself: a six-line block in two folders is found (with its lines), five lines
    are not, and comments, docstrings and indentation do not hide a copy."""
    body = ["x = slot.base_gfn", "y = x + 1", "if y:", "    z = y * 2", "w = z - x", "v = w | y"]
    a, b = tmp_path / "kvm", tmp_path / "zarch"
    for d in (a, b):
        d.mkdir()
    (a / "m.py").write_text('"""Doc."""\n\ndef f(slot):\n' + "".join(f"    {line}\n" for line in body))
    (b / "n.py").write_text("class C:\n    def g(self, slot):\n        \"\"\"Other doc.\"\"\"\n"
                            + "".join(f"        {line}  # note\n" for line in body))
    found = copies([a, b])
    assert len(found) == 1 and "m.py:4-9" in found[0] and "n.py:4-9" in found[0]
    (b / "n.py").write_text("def g(slot):\n" + "".join(f"    {line}\n" for line in body[:5]))
    assert copies([a, b]) == []
